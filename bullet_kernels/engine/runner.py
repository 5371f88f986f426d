"""The model runner: from requests to logits over a paged KV cache, on graphs where they fit.

One object owns the request path: the KV cache (sized by :mod:`.memory`), the page geometry
(``page_size``, ``max_context``, ``max_pages``, derived once from the config), and the model's
captured graphs (:class:`ModelGraphs`, created on first use where there is a GPU).

    runner = ModelRunner(model, EngineConfig(...))
    runner.capture(Placement(split, "decode"), phases=("decode",))
    runner.reserve([(rid, tokens)])                       # KV pages for the step's tokens
    ids, batch = runner.plan_decode([rid], [token])      # exact CPU batch
    logits = runner.forward(ids, batch, Placement(split, "decode"))

:meth:`prepare` picks the bucket, pads and copies into the graph's static buffers and returns a
:class:`~.step.Step` to launch (the orchestrator's path); :meth:`forward` is prepare + launch.
Where no graph fits (no GPU, a batch beyond every bucket, a placement not captured while
``lazy_capture`` is off) the step runs eagerly on the placement's lane: counted per reason in
:attr:`stats` and warned once per reason. ``prefill``/``decode``/``generate`` are eager
conveniences.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
from typing import Hashable, Sequence

import torch

from ..config import EngineConfig
from ..errors import BulletError
from .batch import ForwardBatch, SeqChunk, pack_input_ids, pad_input_ids, plan_decode, plan_prefill
from .graph_bank import GraphBank
from .kernel_lanes import check_gemm_lane
from .kv_cache import PagedKVCache
from .memory import size_kv_cache
from .model_graphs import ModelGraphs, prefill_groups
from .placement import WHOLE_GPU, Placement
from .step import EagerStep, GraphStep, Step, lane_scope
from .warn import warn_once

# (request id, the token ids this step computes for it)
Request = tuple[Hashable, Sequence[int]]


class ContextTooLong(BulletError, ValueError):
    """A request would exceed the runner's max context; nothing was allocated."""


class ModelRunner:
    def __init__(self, model, cfg: EngineConfig | None = None, partitioner=None):
        """``partitioner`` opens the splits placements name; without one the runner opens
        ``Partitioner(cfg.backend)`` the first time a placement names a split on a GPU."""
        cfg = EngineConfig() if cfg is None else cfg
        max_context = model.max_context if cfg.max_context is None else cfg.max_context
        if not 0 < max_context <= model.max_context:
            raise ValueError(
                f"max_context {max_context} must be in 1..{model.max_context} "
                "(the positions the model's rotary table covers)"
            )
        self.model, self.cfg = model, cfg
        self.max_context = max_context
        self.page_size = cfg.page_size
        self.max_pages = -(-max_context // cfg.page_size)  # page_table width
        self.groups = prefill_groups(model.config.num_layers, cfg.layer_groups)
        self.kv_sizing = size_kv_cache(model.config, cfg, model.dtype, model.device, self.max_pages)
        self.kv_cache = PagedKVCache.for_model(
            model.config, num_pages=self.kv_sizing.num_pages, page_size=cfg.page_size,
            dtype=model.dtype, device=model.device,
        )
        model.attach_kv_cache(self.kv_cache)
        self.partitioner = partitioner
        self._own_partitioner = False
        self._graphs: ModelGraphs | None = None
        self._steps = {"graph": 0, "eager": 0}
        self._eager_reasons: collections.Counter[str] = collections.Counter()
        self._generation_ids = itertools.count()
        self.open_splits()

    def open_splits(self) -> None:
        """Open and verify every split of ``cfg.splits`` now, before the runner does other GPU
        work (docs/green-contexts.md says why); nothing to do without a GPU."""
        if self.device.type != "cuda":
            return
        for split in self.cfg.splits:
            self._partitioner_for(Placement(split, split.names[0])).get(split)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- reserve: KV pages for a step's tokens ---------------------------------------------

    def reserve(self, requests: Sequence[Request]) -> None:
        """Take KV slots for each request's new tokens: all of them, or none on error.

        Raises :class:`ContextTooLong` or :class:`~bullet_kernels.engine.KVCacheExhausted`.
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

    # -- plan: the exact CPU batch -----------------------------------------------------------

    def _chunk(self, request_id: Hashable, num_new: int) -> SeqChunk:
        total = self.kv_cache.num_tokens(request_id)
        if total < num_new:
            raise ValueError(
                f"request {request_id!r} has {total} reserved slots for {num_new} new tokens: "
                "call reserve() first"
            )
        return SeqChunk(self.kv_cache.pages(request_id), total - num_new, num_new)

    def plan_prefill(self, requests: Sequence[Request]) -> tuple[torch.Tensor, ForwardBatch]:
        """CPU ``(input_ids, batch)`` for reserved requests, unpadded (:meth:`prepare` pads).

        A request whose earlier tokens are cached continues from them (chunked prefill).
        """
        chunks = [self._chunk(r, len(tokens)) for r, tokens in requests]
        batch = plan_prefill(chunks, page_size=self.page_size, max_pages=self.max_pages)
        return pack_input_ids([t for _, t in requests], batch.bucket.num_tokens), batch

    def plan_decode(self, request_ids: Sequence[Hashable], tokens: Sequence[int]) -> tuple[torch.Tensor, ForwardBatch]:
        """CPU ``(input_ids, batch)`` for one reserved token per request, unpadded."""
        if len(request_ids) != len(tokens):
            raise ValueError(f"{len(request_ids)} requests but {len(tokens)} tokens")
        chunks = [self._chunk(r, 1) for r in request_ids]
        batch = plan_decode(chunks, page_size=self.page_size, max_pages=self.max_pages)
        return pack_input_ids([[t] for t in tokens], batch.bucket.num_tokens), batch

    def plan_mixed(
        self, prefill: Sequence[Request], decode_ids: Sequence[Hashable], decode_tokens: Sequence[int]
    ) -> tuple[torch.Tensor, ForwardBatch]:
        """CPU ``(input_ids, batch)`` of one fused step: the prefill chunks first, then one token
        per decode request, all reserved already; a prefill-path batch (``is_decode`` False),
        unpadded. Logits row i is the last token of sequence i in that order."""
        if len(decode_ids) != len(decode_tokens):
            raise ValueError(f"{len(decode_ids)} decode requests but {len(decode_tokens)} tokens")
        requests = list(prefill) + [(r, [t]) for r, t in zip(decode_ids, decode_tokens)]
        if not requests:
            raise ValueError("a mixed step needs at least one sequence")
        twice = [r for r, n in collections.Counter(r for r, _ in requests).items() if n > 1]
        if twice:
            raise ValueError(f"request(s) {', '.join(map(repr, twice))} appear more than once in one mixed step")
        return self.plan_prefill(requests)

    # -- graphs --------------------------------------------------------------------------

    def _partitioner_for(self, placement: Placement):
        if placement.split is not None and self.partitioner is None:
            from ..partition import Partitioner

            self.partitioner, self._own_partitioner = Partitioner(self.cfg.backend), True
            if self._graphs is not None:
                self._graphs.bank.partitioner = self.partitioner
        return self.partitioner

    @property
    def graphs(self) -> ModelGraphs:
        """The model's graphs (created on first use; needs the model on a GPU)."""
        if self._graphs is None:
            bank = GraphBank(self.partitioner, self.device.index if self.device.type == "cuda" else None)
            self._graphs = ModelGraphs(self.model, bank, self.cfg, self.max_pages)
        return self._graphs

    def capture(self, placement: Placement | None = None, phases=("decode", "prefill"), progress: bool = False,
                gemm_lane: Placement | None = None) -> dict:
        """Capture every configured bucket of ``phases`` on ``placement`` (default: whole GPU).

        ``gemm_lane``: kernel-level placement, every GEMM on that lane (decode graphs only, so
        pass ``phases=("decode",)``; docs/kernel-placement.md).
        Returns ``{"graphs", "seconds", "memory_bytes"}``.
        """
        placement = WHOLE_GPU if placement is None else placement
        self._partitioner_for(placement)
        if gemm_lane is not None:
            self._partitioner_for(gemm_lane)
        return self.graphs.capture(placement, phases, progress, gemm_lane)

    def release_graphs(self, placement: Placement | None = None) -> int:
        """Drop captured graphs: all of them (and their buffers), or those of ``placement``."""
        if self._graphs is None:
            return 0
        if placement is not None:
            return self._graphs.release(placement)
        dropped = len(self._graphs.bank)
        self._graphs.bank.close()
        self._graphs = None
        torch.cuda.empty_cache()
        return dropped

    def close(self) -> None:
        """Release every graph, and the partitioner if the runner opened it."""
        self.release_graphs()
        if self._own_partitioner:
            self.partitioner.close()
            self.partitioner, self._own_partitioner = None, False

    # -- prepare and launch ----------------------------------------------------------------

    def _placements(self, phase: str, placement) -> list[Placement]:
        groups = len(self.groups) if phase == "prefill" else 1
        if placement is None or isinstance(placement, Placement):
            return [placement or WHOLE_GPU] * groups
        placements = list(placement)
        if phase == "decode" or len(placements) != groups or not all(isinstance(p, Placement) for p in placements):
            raise ValueError(
                f"a {phase} step takes one Placement" + (f" or a list of {groups} (one per layer group)"
                                                          if phase == "prefill" else "")
                + f", got {placement!r}"
            )
        return placements

    def _graph_bucket(self, phase: str, batch: ForwardBatch, placements: list[Placement],
                      gemm_lane: Placement | None = None) -> tuple[int | None, str]:
        """The bucket whose graphs run this step, or None and the reason none fits."""
        if self.device.type != "cuda":
            return None, "no GPU"
        if phase == "decode" and batch.bucket.batch_size > max(self.cfg.decode_buckets):
            return None, f"decode batch beyond the largest decode bucket ({max(self.cfg.decode_buckets)})"
        if phase == "prefill" and batch.bucket.batch_size > self.cfg.prefill_max_seqs:
            return None, f"prefill of more sequences than prefill_max_seqs ({self.cfg.prefill_max_seqs})"
        if phase == "prefill" and batch.bucket.num_tokens > max(self.cfg.prefill_buckets):
            return None, f"prefill tokens beyond the largest prefill bucket ({max(self.cfg.prefill_buckets)})"
        bucket = self.graphs.pick_bucket(phase, batch)
        for g, placement in enumerate(placements):
            if not self.graphs.has(self.graphs.key(phase, bucket, placement, g, gemm_lane)):
                where = placement if gemm_lane is None else f"{placement}+gemm@{gemm_lane}"
                return None, f"no {phase} graph captured for {where} (lazy_capture is off)"
        return bucket, ""

    def prepare(self, input_ids: torch.Tensor, batch: ForwardBatch, placement=None,
                gemm_lane: Placement | None = None) -> Step:
        """A step for an exact batch from :meth:`plan_prefill`/:meth:`plan_decode`.

        ``placement``: a :class:`Placement` (default: whole GPU); a prefill may take a list with
        one per layer group. ``gemm_lane``: kernel-level placement of a decode step, its GEMMs on
        that lane (graphs only; an eager fallback runs every kernel on ``placement``). Picks the
        smallest bucket that fits, pads the batch to it and copies it into the bucket's static
        buffers on the current stream; the step's launch waits for those copies. Where no graph
        fits, an eager step (counted in :attr:`stats`).
        """
        phase = "decode" if batch.is_decode else "prefill"
        placements = self._placements(phase, placement)
        for p in placements:
            check_gemm_lane(phase, p, gemm_lane)  # refused here, on any machine, not at launch
        if self.device.type == "cuda":
            for p in placements + ([gemm_lane] if gemm_lane is not None else []):
                self._partitioner_for(p)
        bucket, reason = self._graph_bucket(phase, batch, placements, gemm_lane)
        if gemm_lane is not None and bucket is not None:
            # the GEMM split not open, or a backend that cannot place single kernels: refused
            # now, not at the first replay of a lazily captured graph
            self.graphs.bank.check_kernel_placement(self.graphs.key(phase, bucket, placements[0], 0, gemm_lane))
        if bucket is None:
            self._steps["eager"] += 1
            self._eager_reasons[reason] += 1
            warn_once(f"bullet_kernels engine: running steps eagerly: {reason} (counted in ModelRunner.stats)")
            return EagerStep(self, phase, input_ids, batch, placements, self.groups, reason)
        shape = self.graphs.bucket_shape(phase, bucket)
        padded = batch.pad_to(shape.num_tokens, shape.batch_size)
        ids = pad_input_ids(input_ids, shape.num_tokens)
        # Page-locked, so the copies never wait for the stream's earlier work: a caller may
        # prepare the next step while the current one still runs (torch's pinned allocator keeps
        # the memory until the copies are done). The ids may already be on the GPU.
        padded = padded.pin_memory()
        if not ids.is_cuda:
            ids = ids.pin_memory()
        self.graphs.load(phase, bucket, ids, padded)
        self._steps["graph"] += 1
        return GraphStep(self.graphs, phase, bucket, placements, batch.bucket.batch_size, gemm_lane)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, placement=None, stream=None,
                gemm_lane: Placement | None = None) -> torch.Tensor:
        """Prepare and launch; fp32 logits ``[rows, vocab]`` (a graph step's are a view of its
        static buffer, valid until that bucket runs again)."""
        step = self.prepare(input_ids, batch, placement, gemm_lane)
        return step.launch(stream)[: step.rows]

    def eager_scope(self, placement: Placement):
        """Where eager work of ``placement`` runs: its lane's stream and SM budget on a GPU."""
        if placement.split is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return lane_scope(self._partitioner_for(placement).get(placement.split), placement.lane)

    @property
    def stats(self) -> dict:
        """Steps prepared with graphs and eagerly, and the eager steps by reason."""
        return {
            "graph_steps": self._steps["graph"],
            "eager_steps": self._steps["eager"],
            "eager_reasons": dict(self._eager_reasons),
        }

    # -- run: the graph-safe forward ---------------------------------------------------

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """fp32 logits ``[batch_size, vocab]``, one row per sequence slot of the batch.

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
