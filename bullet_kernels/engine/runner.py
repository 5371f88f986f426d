"""Eager model runner over a paged KV cache: reserve -> plan (CPU) -> run (graph-safe forward).

The three steps are public so a graph bank can capture :meth:`ModelRunner.run` per bucket and
replay it: ``reserve`` takes KV pages for the step's tokens, ``plan_prefill``/``plan_decode``
build the padded ``(input_ids, ForwardBatch)`` on the CPU, ``run`` is the model forward.
``prefill``, ``decode`` and ``generate`` chain them for eager use.
"""

from __future__ import annotations

import itertools
from typing import Hashable, Sequence

import torch

from ..batch import ForwardBatch, SeqChunk, pack_input_ids, plan_decode, plan_prefill
from ..errors import BulletError
from ..kv_cache import PagedKVCache
from ..models.llama import LlamaModel

# (request id, the token ids this step computes for it)
Request = tuple[Hashable, Sequence[int]]


class ContextTooLong(BulletError, ValueError):
    """A request would exceed the runner's max context; nothing was allocated."""


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache, max_context: int | None = None):
        max_context = model.max_context if max_context is None else max_context
        if not 0 < max_context <= model.max_context:
            raise ValueError(
                f"max_context {max_context} must be in 1..{model.max_context} "
                "(the positions the model's rotary table covers)"
            )
        self.model = model
        self.kv_cache = kv_cache
        self.max_context = max_context
        self.max_pages = -(-max_context // kv_cache.page_size)  # page_table width
        model.attach_kv_cache(kv_cache)
        self._generation_ids = itertools.count()

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- reserve: KV pages for a step's tokens ---------------------------------------------

    def reserve(self, requests: Sequence[Request]) -> None:
        """Take KV slots for each request's new tokens: all of them, or none on error.

        Raises :class:`ContextTooLong` or :class:`~bullet_kernels.kv_cache.KVCacheExhausted`.
        """
        vocab = self.model.config.vocab_size
        for request_id, tokens in requests:
            cached = self.kv_cache.num_tokens(request_id)
            if cached + len(tokens) > self.max_context:
                raise ContextTooLong(
                    f"request {request_id!r} needs {cached + len(tokens)} tokens of context "
                    f"({cached} cached + {len(tokens)} new) but max_context is {self.max_context}"
                )
            bad = [t for t in tokens if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"request {request_id!r}: token ids {bad[:4]} outside vocab 0..{vocab - 1}")
        self.kv_cache.allocate_many([(r, len(tokens)) for r, tokens in requests])

    def release(self, request_id: Hashable) -> None:
        """Free a finished request's KV pages."""
        self.kv_cache.free(request_id)

    # -- plan: CPU metadata, padded to a bucket ------------------------------------------

    def _chunk(self, request_id: Hashable, num_new: int) -> SeqChunk:
        total = self.kv_cache.num_tokens(request_id)
        if total < num_new:
            raise ValueError(
                f"request {request_id!r} has {total} reserved slots for {num_new} new tokens: "
                "call reserve() first"
            )
        return SeqChunk(self.kv_cache.pages(request_id), total - num_new, num_new)

    def plan_prefill(
        self,
        requests: Sequence[Request],
        *,
        num_tokens: int | None = None,
        batch_size: int | None = None,
    ) -> tuple[torch.Tensor, ForwardBatch]:
        """CPU ``(input_ids, batch)`` for reserved requests, padded to ``(num_tokens, batch_size)``.

        A request whose earlier tokens are cached continues from them (chunked prefill).
        """
        chunks = [self._chunk(r, len(tokens)) for r, tokens in requests]
        batch = plan_prefill(
            chunks, page_size=self.kv_cache.page_size, max_pages=self.max_pages,
            num_tokens=num_tokens, batch_size=batch_size,
        )
        return pack_input_ids([t for _, t in requests], batch.bucket.num_tokens), batch

    def plan_decode(
        self, request_ids: Sequence[Hashable], tokens: Sequence[int], *, batch_size: int | None = None
    ) -> tuple[torch.Tensor, ForwardBatch]:
        """CPU ``(input_ids, batch)`` for one reserved token per request, padded to ``batch_size``."""
        if len(request_ids) != len(tokens):
            raise ValueError(f"{len(request_ids)} requests but {len(tokens)} tokens")
        chunks = [self._chunk(r, 1) for r in request_ids]
        batch = plan_decode(
            chunks, page_size=self.kv_cache.page_size, max_pages=self.max_pages, batch_size=batch_size
        )
        return pack_input_ids([[t] for t in tokens], batch.bucket.num_tokens), batch

    # -- run: the graph-safe forward ---------------------------------------------------

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """fp32 logits ``[batch_size, vocab]``, one row per sequence slot of the bucket.

        ``input_ids`` and ``batch`` must already be on the model's device.
        """
        return self.model(input_ids, batch)

    # -- eager conveniences --------------------------------------------------------------

    def prefill(self, requests: Sequence[Request]) -> torch.Tensor:
        """Reserve, plan and run; logits of each request's last new token: ``[len(requests), vocab]``."""
        self.reserve(requests)
        input_ids, batch = self.plan_prefill(requests)
        return self.run(input_ids.to(self.device), batch.to(self.device))

    def decode(self, request_ids: Sequence[Hashable], tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token per request; logits ``[len(request_ids), vocab]``."""
        self.reserve([(r, [t]) for r, t in zip(request_ids, tokens)])
        input_ids, batch = self.plan_decode(request_ids, tokens)
        return self.run(input_ids.to(self.device), batch.to(self.device))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        stop_token_ids: Sequence[int] = (),
    ) -> list[list[int]]:
        """Greedy continuations of ``prompts`` (a request stops early on a stop token, kept)."""
        ids = [("generate", next(self._generation_ids)) for _ in prompts]
        outputs: list[list[int]] = [[] for _ in prompts]
        try:
            logits = self.prefill(list(zip(ids, prompts)))
            active = list(range(len(prompts)))
            for step in range(max_new_tokens):
                next_tokens = logits.argmax(-1).tolist()
                for i, token in zip(active, next_tokens):
                    outputs[i].append(token)
                active = [i for i, t in zip(active, next_tokens) if t not in stop_token_ids]
                if not active or step + 1 == max_new_tokens:
                    break
                logits = self.decode([ids[i] for i in active], [outputs[i][-1] for i in active])
        finally:
            for request_id in ids:
                if request_id in self.kv_cache:
                    self.release(request_id)
        return outputs
