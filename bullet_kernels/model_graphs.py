"""A LlamaModel captured into the graph bank.

Decode: one graph per (batch bucket, SM split, lane) running the whole forward.
Prefill: one graph per (token bucket, layer group, SM split, lane), so the split can change
between layer groups of one prefill. Group graphs hand the residual stream to each other
through static ``hidden``/``residual`` buffers of the bucket: group 0 embeds, the last group
also runs the final norm and lm_head into a static logits buffer.

Static buffers (inputs, batch metadata, group hand-off, logits) belong to a bucket and are
shared by every split's graph of that bucket; the bank's memory pool holds only intermediates.
``plan`` happens on the CPU (``bullet_kernels.batch``); :meth:`ModelGraphs.load` copies a
planned batch into the bucket's buffers; ``run_*`` replays. Nothing here syncs with the host.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from .batch import Bucket, ForwardBatch
from .errors import NoBucketError
from .graph_bank import GraphBank, GraphKey, pick_bucket
from .partition import SMSplit


@dataclasses.dataclass
class BucketBuffers:
    input_ids: torch.Tensor
    batch: ForwardBatch
    hidden: torch.Tensor | None = None  # prefill group hand-off
    residual: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [batch, vocab] fp32, written by the last graph


def layer_groups(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """``[start, end)`` of ``groups`` near-equal layer groups."""
    if not 1 <= groups <= num_layers:
        raise ValueError(f"layer groups must be in 1..{num_layers}, got {groups}")
    bounds = [round(i * num_layers / groups) for i in range(groups + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class ModelGraphs:
    def __init__(
        self,
        model,
        bank: GraphBank,
        *,
        decode_buckets: list[int],
        prefill_buckets: list[int],
        prefill_max_seqs: int = 8,
        groups: int = 4,
        max_pages: int | None = None,
        page_size: int = 16,
        lazy: bool = False,
    ):
        self.model = model
        self.bank = bank
        self.decode_buckets = sorted(decode_buckets)
        self.prefill_buckets = sorted(prefill_buckets)
        self.prefill_max_seqs = prefill_max_seqs
        self.groups = layer_groups(model.config.num_layers, groups)
        self.max_pages = max_pages or -(-model.max_context // page_size)
        self.lazy = lazy  # capture a missing graph on first replay instead of failing
        self._buffers: dict[tuple[str, int], BucketBuffers] = {}

    # -- static buffers -------------------------------------------------------------------
    def buffers(self, phase: str, bucket: int) -> BucketBuffers:
        key = (phase, bucket)
        if key not in self._buffers:
            dev, h = self.model.device, self.model.config.hidden_size
            if phase == "decode":
                shape = Bucket(True, bucket, bucket, self.max_pages)
            else:
                shape = Bucket(False, bucket, self.prefill_max_seqs, self.max_pages)
            bufs = BucketBuffers(torch.zeros(bucket, dtype=torch.int64, device=dev), ForwardBatch.padding(shape, dev))
            # Logits in a static buffer of the bucket, not in the pool: every split's graph of
            # the bucket writes here, so pool memory is not pinned by one output per graph.
            vocab = self.model.config.vocab_size
            bufs.logits = torch.zeros(shape.batch_size, vocab, dtype=torch.float32, device=dev)
            if phase == "prefill":
                bufs.hidden = torch.zeros(bucket, h, dtype=self.model.dtype, device=dev)
                bufs.residual = torch.zeros_like(bufs.hidden)
            self._buffers[key] = bufs
        return self._buffers[key]

    def bucket_for(self, phase: str, batch: ForwardBatch) -> int:
        n = batch.page_table.shape[0] if phase == "decode" else batch.positions.shape[0]
        buckets = self.decode_buckets if phase == "decode" else self.prefill_buckets
        bucket = pick_bucket(buckets, n, "decode batch" if phase == "decode" else "prefill tokens")
        if phase == "prefill" and batch.page_table.shape[0] > self.prefill_max_seqs:
            raise NoBucketError(
                f"prefill of {batch.page_table.shape[0]} sequences; graphs hold at most {self.prefill_max_seqs}"
            )
        return bucket

    def load(self, phase: str, input_ids: torch.Tensor, batch: ForwardBatch) -> int:
        """Copy a CPU-planned batch (planned for exactly this bucket) into the static buffers."""
        bucket = self.bucket_for(phase, batch)
        bufs = self.buffers(phase, bucket)
        batch.copy_into(bufs.batch)
        bufs.input_ids.copy_(input_ids, non_blocking=True)
        return bucket

    # -- the captured functions -----------------------------------------------------------
    def _decode_fn(self, bufs: BucketBuffers):
        def fn():
            bufs.logits.copy_(self.model(bufs.input_ids, bufs.batch))
            return bufs.logits

        return fn

    def _prefill_group_fn(self, bufs: BucketBuffers, g: int):
        start, end = self.groups[g]
        last = g == len(self.groups) - 1

        def fn():
            if g == 0:
                hidden, residual = self.model.embed(bufs.input_ids)
            else:
                hidden, residual = bufs.hidden, bufs.residual
            hidden, residual = self.model.layers_forward(hidden, residual, bufs.batch, start, end)
            if last:
                bufs.logits.copy_(self.model.final(hidden, residual, bufs.batch.logits_indices))
                return bufs.logits
            bufs.hidden.copy_(hidden)
            bufs.residual.copy_(residual)
            return bufs.hidden

        return fn

    # -- capture ---------------------------------------------------------------------------
    def _plan(self, split, lane, phases) -> list[tuple[GraphKey, object]]:
        """Every (key, function) to capture for one (split, lane), largest buckets first so
        smaller ones reuse the pool."""
        plan = []
        for phase in phases:
            buckets = self.decode_buckets if phase == "decode" else self.prefill_buckets
            for bucket in sorted(buckets, reverse=True):
                bufs = self.buffers(phase, bucket)
                if phase == "decode":
                    plan.append((GraphKey("decode", bucket, split, lane), self._decode_fn(bufs)))
                else:
                    plan += [(GraphKey("prefill", bucket, split, lane, g), self._prefill_group_fn(bufs, g))
                             for g in range(len(self.groups))]
        return plan

    @torch.no_grad()
    def capture(self, split: SMSplit | None, lane: str, phases=("decode", "prefill"), progress: bool = False) -> dict:
        """Capture every bucket of ``phases`` for one (split, lane). Returns time and memory."""
        t0, mem0 = time.perf_counter(), torch.cuda.memory_reserved()
        plan = self._plan(split, lane, phases)
        if progress:
            from tqdm import tqdm

            where = f"{split.key}:{lane}" if split else "whole GPU"
            plan = tqdm(plan, desc=f"capturing {where}", unit="graph")
        for key, fn in plan:
            self.bank.capture(key, fn)
        return {
            "graphs": len(plan),
            "seconds": time.perf_counter() - t0,
            "memory_bytes": torch.cuda.memory_reserved() - mem0,
        }

    def _replay(self, key: GraphKey, stream):
        if self.lazy and key not in self.bank:
            with torch.no_grad():
                bufs = self.buffers(key.phase, key.bucket)
                fn = self._decode_fn(bufs) if key.phase == "decode" else self._prefill_group_fn(bufs, key.group)
                self.bank.capture(key, fn)
        return self.bank.replay(key, stream)

    # -- replay ----------------------------------------------------------------------------
    def run_decode(self, bucket: int, split: SMSplit | None, lane: str, stream=None) -> torch.Tensor:
        """Replay the decode graph; returns the static ``[bucket, vocab]`` fp32 logits."""
        return self._replay(GraphKey("decode", bucket, split, lane), stream)

    def run_prefill_group(self, bucket: int, group: int, split: SMSplit | None, lane: str, stream=None):
        return self._replay(GraphKey("prefill", bucket, split, lane, group), stream)

    def run_prefill(self, bucket: int, placement, stream=None) -> torch.Tensor:
        """Replay every layer group; ``placement`` is one ``(split, lane)`` for all groups or a
        list with one per group (the split may change between groups)."""
        per_group = placement if isinstance(placement, list) else [placement] * len(self.groups)
        if len(per_group) != len(self.groups):
            raise ValueError(f"need one (split, lane) per layer group ({len(self.groups)}), got {len(per_group)}")
        out = None
        for g, (split, lane) in enumerate(per_group):
            out = self.run_prefill_group(bucket, g, split, lane, stream)
        return out
