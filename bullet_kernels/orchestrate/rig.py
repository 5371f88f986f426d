"""A measurement rig: a random-weight model, its runner, and KV filled for the shapes to time.

The profiler and the co-location benchmark time the same kinds of step: a decode step of
``batch`` sequences with ``context`` cached tokens each, a prefill of ``tokens`` prompt tokens
(layer group by layer group), and a chunked-prefill step (a chunk of the prompt fused with one
token per decode sequence). The rig reserves KV once for the largest shape (every decode
sequence at the largest context, one prompt at the largest size), fills it with seeded noise
(attention over zeros is not a measurement), and plans smaller shapes as prefixes of those
pages, so no shape allocates while being timed.

Steps come from :meth:`ModelRunner.prepare`, which loads a bucket's static buffers: prepare a
step right before replaying it, on the stream that replays it, because the next step of the
same bucket overwrites those buffers.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import EngineConfig
from ..engine.batch import SeqChunk, pack_input_ids, plan_decode, plan_prefill
from ..engine.placement import WHOLE_GPU, Placement
from ..engine.runner import ModelRunner
from ..engine.step import Step
from .planner import MixWork

PROMPT = "prompt"


class Rig:
    def __init__(self, preset: str, cfg: EngineConfig, *, max_batch: int, max_context: int, max_prompt: int,
                 partitioner=None, seed: int = 0):
        from ..models.presets import random_model

        self.max_batch, self.max_context, self.max_prompt = max_batch, max_context, max_prompt
        model_context = max(max_prompt, max_context + 1)
        torch.manual_seed(seed)
        self.model = random_model(preset, seed=seed, device="cuda", dtype=torch.bfloat16, max_context=model_context)
        page = cfg.page_size
        pages = max_batch * -(-(max_context + 1) // page) + -(-max_prompt // page) + 2
        cfg = dataclasses.replace(cfg, kv_num_pages=pages, max_context=model_context, lazy_capture=True)
        self.runner = ModelRunner(self.model, cfg, partitioner=partitioner)
        self.cfg = cfg
        self.runner.kv_cache.randomize_(std=0.5, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        vocab = self.model.config.vocab_size
        self.decode_ids = [f"decode-{i}" for i in range(max_batch)]
        self.runner.kv_cache.allocate_many([(r, max_context + 1) for r in self.decode_ids] + [(PROMPT, max_prompt)])
        self.tokens = torch.randint(0, vocab, (max_prompt,), generator=gen).tolist()
        self.decode_tokens = torch.randint(0, vocab, (max_batch,), generator=gen).tolist()
        self._geometry = dict(page_size=self.runner.page_size, max_pages=self.runner.max_pages)

    # -- planning ----------------------------------------------------------------------------

    def _pages(self, request_id, tokens: int) -> list[int]:
        return list(self.runner.kv_cache.pages(request_id)[: -(-tokens // self.runner.page_size)])

    def _decode_chunks(self, batch: int, context: int) -> list[SeqChunk]:
        if not 1 <= batch <= self.max_batch or not 0 <= context <= self.max_context:
            raise ValueError(f"decode shape batch {batch}, context {context} is outside the rig's "
                             f"batch 1..{self.max_batch}, context 0..{self.max_context}")
        return [SeqChunk(self._pages(r, context + 1), context, 1) for r in self.decode_ids[:batch]]

    def _prompt_chunk(self, start: int, tokens: int) -> SeqChunk:
        if not 0 <= start or start + tokens > self.max_prompt or tokens < 1:
            raise ValueError(f"prompt tokens {start}..{start + tokens} are outside the rig's 0..{self.max_prompt}")
        return SeqChunk(self._pages(PROMPT, start + tokens), start, tokens)

    def decode_batch(self, batch: int, context: int):
        fb = plan_decode(self._decode_chunks(batch, context), **self._geometry)
        return pack_input_ids([[t] for t in self.decode_tokens[:batch]], batch), fb

    def prefill_batch(self, tokens: int, start: int = 0):
        fb = plan_prefill([self._prompt_chunk(start, tokens)], **self._geometry)
        return pack_input_ids([self.tokens[start:start + tokens]], tokens), fb

    def mixed_batch(self, start: int, chunk: int, batch: int, context: int):
        """One chunked-prefill step: prompt tokens ``start..start+chunk`` then one token for each
        of ``batch`` decode sequences (``chunk`` 0: decode rows only, on the prefill path)."""
        chunks = ([self._prompt_chunk(start, chunk)] if chunk else []) + self._decode_chunks(batch, context)
        lists = ([self.tokens[start:start + chunk]] if chunk else []) + [[t] for t in self.decode_tokens[:batch]]
        fb = plan_prefill(chunks, **self._geometry)
        return pack_input_ids(lists, fb.bucket.num_tokens), fb

    # -- steps -------------------------------------------------------------------------------

    def prepare(self, planned, placement: Placement, gemm_lane: Placement | None = None) -> Step:
        step = self.runner.prepare(*planned, placement, gemm_lane)
        if step.eager_reason:  # lazy capture is on: an eager step here is a sizing bug
            raise RuntimeError(f"no graph for this step on {placement}: {step.eager_reason}")
        return step

    def mix_launchers(self, work: MixWork, streams: dict, gemm_lane: Placement | None = None,
                      decode_home: Placement = WHOLE_GPU) -> dict:
        """The orchestrator's launch functions for ``work``'s prompt and decode batch: each step
        prepared once, on its phase's stream (``streams["prefill"]``, ``streams["decode"]``), so
        its static-buffer copies come before its replays there. ``gemm_lane``: the decode
        steps' GEMMs run on that lane (kernel-level placement): give ``decode_home``, the split
        lane the launches put decode on (a whole-GPU decode has no home lane to widen)."""
        with torch.cuda.stream(streams["prefill"]):
            prefill = self.prepare(self.prefill_batch(work.prompt_tokens), WHOLE_GPU)
        with torch.cuda.stream(streams["decode"]):
            decode = self.prepare(self.decode_batch(work.decode_batch, work.context), decode_home, gemm_lane)
        return {"prefill": lambda i, p, s: prefill.launch_group(i, p, s),
                "decode": lambda i, p, s: decode.launch_group(0, p, s)}

    def close(self) -> None:
        self.runner.close()
        self.runner = self.model = None
        torch.cuda.empty_cache()
