"""A LlamaModel captured into the graph bank (used through :class:`~.runner.ModelRunner`).

Decode: one graph per (batch bucket, placement) running the whole forward; optionally with
kernel-level placement, its GEMMs on another lane (``gemm_lane``, :mod:`.kernel_lanes`), a
separate graph of its own key beside the plain one.
Prefill: one graph per (token bucket, layer group, placement), so the split can change
between layer groups of one prefill. Group graphs hand the residual stream to each other
through static ``hidden``/``residual`` buffers of the bucket: group 0 embeds, the last group
also runs the final norm and lm_head into a static logits buffer.

Static buffers (inputs, batch metadata, group hand-off, logits) belong to a bucket and are
shared by every placement's graph of that bucket; the bank's memory pools hold only
intermediates, one pool per phase. Planning happens on the CPU (:mod:`.batch`);
:meth:`ModelGraphs.load` copies a bucket-shaped batch into the bucket's buffers and
:meth:`ModelGraphs.replay` replays. Nothing here syncs with the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from ..config import EngineConfig
from ..errors import NoBucketError
from .batch import Bucket, ForwardBatch
from .graph_bank import GraphBank, GraphKey, pick_bucket
from .placement import Placement

PHASES = ("decode", "prefill")


@dataclasses.dataclass
class BucketBuffers:
    input_ids: torch.Tensor
    batch: ForwardBatch
    logits: torch.Tensor  # [batch, vocab] fp32, written by the (last) graph
    hidden: torch.Tensor | None = None  # prefill group hand-off
    residual: torch.Tensor | None = None


def layer_groups(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """``[start, end)`` of ``groups`` near-equal layer groups."""
    if not 1 <= groups <= num_layers:
        raise ValueError(f"layer groups must be in 1..{num_layers}, got {groups}")
    bounds = [round(i * num_layers / groups) for i in range(groups + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def prefill_groups(num_layers: int, wanted: int) -> list[tuple[int, int]]:
    """The configured layer groups of a model: ``wanted`` of them, at most one per layer."""
    return layer_groups(num_layers, min(wanted, num_layers))


def _check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; phases: {', '.join(PHASES)}")


class ModelGraphs:
    def __init__(self, model, bank: GraphBank, cfg: EngineConfig, max_pages: int):
        self.model = model
        self.bank = bank
        self.buckets = {"decode": cfg.decode_buckets, "prefill": cfg.prefill_buckets}
        self.prefill_max_seqs = cfg.prefill_max_seqs
        self.groups = prefill_groups(model.config.num_layers, cfg.layer_groups)
        self.max_pages = max_pages
        self.lazy = cfg.lazy_capture  # capture a missing graph on first replay
        self._buffers: dict[tuple[str, int], BucketBuffers] = {}

    def num_groups(self, phase: str) -> int:
        return len(self.groups) if phase == "prefill" else 1

    # -- buckets and static buffers -------------------------------------------------------
    def bucket_shape(self, phase: str, bucket: int) -> Bucket:
        _check_phase(phase)
        if phase == "decode":
            return Bucket(True, bucket, bucket, self.max_pages)
        return Bucket(False, bucket, self.prefill_max_seqs, self.max_pages)

    def pick_bucket(self, phase: str, batch: ForwardBatch) -> int:
        """The smallest bucket ``batch`` fits; :class:`NoBucketError` naming the limit otherwise."""
        _, tokens, seqs, pages = batch.bucket
        if pages != self.max_pages:
            raise ValueError(f"batch planned for {pages} pages per sequence; the graphs hold {self.max_pages}")
        if phase == "decode":
            return pick_bucket(self.buckets["decode"], seqs, "decode batch")
        if seqs > self.prefill_max_seqs:
            raise NoBucketError(f"prefill of {seqs} sequences; graphs hold at most {self.prefill_max_seqs}")
        return pick_bucket(self.buckets["prefill"], tokens, "prefill tokens")

    def buffers(self, phase: str, bucket: int) -> BucketBuffers:
        key = (phase, bucket)
        if key not in self._buffers:
            dev, shape = self.model.device, self.bucket_shape(phase, bucket)
            # Logits in a static buffer of the bucket, not in the pool: every placement's graph
            # of the bucket writes here, so pool memory is not pinned by one output per graph.
            bufs = BucketBuffers(
                input_ids=torch.zeros(bucket, dtype=torch.int64, device=dev),
                batch=ForwardBatch.padding(shape, dev),
                logits=torch.zeros(shape.batch_size, self.model.config.vocab_size, dtype=torch.float32, device=dev),
            )
            if phase == "prefill":
                bufs.hidden = torch.zeros(bucket, self.model.config.hidden_size, dtype=self.model.dtype, device=dev)
                bufs.residual = torch.zeros_like(bufs.hidden)
            self._buffers[key] = bufs
        return self._buffers[key]

    def load(self, phase: str, bucket: int, input_ids: torch.Tensor, batch: ForwardBatch) -> None:
        """Copy a batch already padded to ``bucket`` into its static buffers (current stream)."""
        bufs = self.buffers(phase, bucket)
        batch.copy_into(bufs.batch)
        bufs.input_ids.copy_(input_ids, non_blocking=True)

    # -- the captured functions -----------------------------------------------------------
    def _fn(self, key: GraphKey):
        bufs = self.buffers(key.phase, key.bucket)
        if key.phase == "decode":
            def decode():
                bufs.logits.copy_(self.model(bufs.input_ids, bufs.batch))
                return bufs.logits

            return decode
        g = key.group
        start, end = self.groups[g]
        last = g == len(self.groups) - 1

        def prefill_group():
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

        return prefill_group

    def key(self, phase: str, bucket: int, placement: Placement, group: int = 0,
            gemm_lane: Placement | None = None) -> GraphKey:
        """The graph of one bucket and group on ``placement``; ``gemm_lane``: its GEMMs' lane
        (decode only; None: every kernel on ``placement``)."""
        return GraphKey(phase, bucket, placement.split, placement.lane, group, gemm_lane=gemm_lane)

    # -- capture and replay ---------------------------------------------------------------
    @torch.no_grad()
    def capture(self, placement: Placement, phases=PHASES, progress: bool = False,
                gemm_lane: Placement | None = None) -> dict:
        """Capture every bucket of ``phases`` on one placement, largest buckets first so smaller
        ones reuse the pool. Returns ``{"graphs", "seconds", "memory_bytes"}``.

        ``gemm_lane``: capture with every GEMM on that lane (decode only: pass
        ``phases=("decode",)``)."""
        for phase in phases:
            _check_phase(phase)
        if gemm_lane is not None and tuple(phases) != ("decode",):
            raise ValueError(f"gemm_lane={gemm_lane} places decode graphs only; capture with phases=('decode',), "
                             f"got phases={tuple(phases)}")
        t0, mem0 = time.perf_counter(), torch.cuda.memory_reserved()
        keys = [self.key(phase, bucket, placement, g, gemm_lane)
                for phase in phases for bucket in sorted(self.buckets[phase], reverse=True)
                for g in range(self.num_groups(phase))]
        if progress:
            from tqdm import tqdm

            where = placement if gemm_lane is None else f"{placement}+gemm@{gemm_lane}"
            keys = tqdm(keys, desc=f"capturing {where}", unit="graph")
        for key in keys:
            self.bank.capture(key, self._fn(key))
        return {
            "graphs": len(keys),
            "seconds": time.perf_counter() - t0,
            "memory_bytes": torch.cuda.memory_reserved() - mem0,
        }

    def has(self, key: GraphKey) -> bool:
        """A replay of ``key`` will not fail for want of a graph (captured, or lazy capture on)."""
        return self.lazy or key in self.bank

    def replay(self, key: GraphKey, stream=None) -> torch.Tensor:
        """Replay (capturing first when lazy); returns the static logits or group hand-off."""
        if self.lazy and key not in self.bank:
            with torch.no_grad(), self._hand_off_kept(key):
                self.bank.capture(key, self._fn(key))
        return self.bank.replay(key, stream)

    @contextlib.contextmanager
    def _hand_off_kept(self, key: GraphKey):
        """Capturing runs the function eagerly first (warm-up). A middle prefill group reads and
        rewrites the bucket's hand-off buffers, so a capture in the middle of a prefill would
        apply its layers more than once: keep the buffers as they were. (Group 0 only writes
        them from the input ids, the last group only reads them, decode has none.)"""
        # Every lazy capture waits for all queued work first: its warm-up runs and probe replay
        # share memory pools and buffers with graphs other streams may still be running.
        torch.cuda.synchronize()
        middle = key.phase == "prefill" and 0 < key.group < len(self.groups) - 1
        if not middle:
            yield
            return
        bufs = self.buffers(key.phase, key.bucket)
        kept = bufs.hidden.clone(), bufs.residual.clone()
        try:
            yield
        finally:
            torch.cuda.synchronize()
            bufs.hidden.copy_(kept[0])
            bufs.residual.copy_(kept[1])
            torch.cuda.synchronize()

    def release(self, placement: Placement | None = None) -> int:
        """Drop the graphs that run on ``placement`` (all when None): those whose home lane it is
        and those whose GEMMs run on it. Static buffers stay."""
        return self.bank.release(None if placement is None else (
            lambda k: k.placement == placement or k.gemm_lane == placement))
