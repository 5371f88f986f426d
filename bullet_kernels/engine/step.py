"""A prepared step: what :meth:`ModelRunner.prepare` returns and the orchestrator launches.

Two kinds with one interface. :class:`GraphStep` replays captured graphs whose static buffers
already hold the padded batch; :class:`EagerStep` runs the model eagerly, on the placement's lane
where there is a GPU, when no captured graph fits (the runner counts and names the reason).

A graph step may carry a ``gemm_lane`` (kernel-level placement, decode only): its graphs run
their GEMMs on that lane and the rest on the step's placement.

``launch(stream)`` runs every layer group in order on one stream; ``launch_group(g, ...)`` runs
one, so a caller can put the groups of one prefill on different lanes and order them with
events. Decode has one group.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Sequence

import torch

from ..kernels.sizing import sm_budget
from .batch import ForwardBatch
from .model_graphs import ModelGraphs
from .placement import Placement


class Step(abc.ABC):
    phase: str  # "decode" or "prefill"
    rows: int  # real sequences: the first ``rows`` rows of the logits
    placements: list[Placement]  # one per layer group
    eager_reason: str = ""  # why this step runs without graphs ("" for a graph step)

    @property
    def num_groups(self) -> int:
        return len(self.placements)

    def launch(self, stream=None) -> torch.Tensor:
        """Run every layer group; returns the logits (fp32 ``[rows or more, vocab]``)."""
        out = None
        for g in range(self.num_groups):
            out = self.launch_group(g, stream=stream)
        return out

    @abc.abstractmethod
    def launch_group(self, g: int, placement: Placement | None = None, stream=None) -> torch.Tensor:
        """Run layer group ``g`` on ``placement`` (default: the one prepared) and ``stream``
        (default: the current one); the last group returns the logits."""

    def _placement(self, g: int, placement: Placement | None) -> Placement:
        if not 0 <= g < self.num_groups:
            raise IndexError(f"layer group {g} of a {self.phase} step with {self.num_groups} group(s)")
        return self.placements[g] if placement is None else placement


class GraphStep(Step):
    """Replays of one bucket's graphs. The logits are the bucket's static buffer ``[bucket rows,
    vocab]``: valid until the next replay of that bucket (clone to keep them)."""

    def __init__(self, graphs: ModelGraphs, phase: str, bucket: int, placements: list[Placement], rows: int,
                 gemm_lane: Placement | None = None):
        self.graphs, self.phase, self.bucket = graphs, phase, bucket
        self.placements, self.rows = placements, rows
        self.gemm_lane = gemm_lane  # kernel-level placement: the lane of every launch's GEMMs
        self._ready = torch.cuda.Event()
        self._ready.record()  # the copies into the static buffers, on the preparing stream

    def launch_group(self, g: int, placement: Placement | None = None, stream=None) -> torch.Tensor:
        key = self.graphs.key(self.phase, self.bucket, self._placement(g, placement), g, self.gemm_lane)
        (stream or torch.cuda.current_stream()).wait_event(self._ready)
        return self.graphs.replay(key, stream)


class EagerStep(Step):
    """The model run eagerly on the exact (unpadded) batch; logits are exactly ``[rows, vocab]``.
    Every kernel runs on the placement's lane (a GEMM lane asked of the runner applies to graphs
    only: the eager fallback is for correctness, not speed)."""

    def __init__(self, runner, phase: str, input_ids: torch.Tensor, batch: ForwardBatch,
                 placements: list[Placement], groups: Sequence[tuple[int, int]], reason: str):
        self.runner, self.phase, self.placements = runner, phase, placements
        self.input_ids, self.batch = input_ids.to(runner.device), batch.to(runner.device)
        self.rows, self.groups, self.eager_reason = batch.bucket.batch_size, list(groups), reason
        self._hand_off: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_group = -1  # the group that produced _hand_off
        self._ready = None
        if runner.device.type == "cuda":  # the copies to the device, on the preparing stream
            self._ready = torch.cuda.Event()
            self._ready.record()

    @torch.no_grad()
    def launch_group(self, g: int, placement: Placement | None = None, stream=None) -> torch.Tensor:
        where = self._placement(g, placement)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if self._ready is not None:
                torch.cuda.current_stream().wait_event(self._ready)
            return self._run_group(g, where)

    def _run_group(self, g: int, where: Placement) -> torch.Tensor:
        model = self.runner.model
        with self.runner.eager_scope(where):
            if self.phase == "decode":
                return model(self.input_ids, self.batch)
            if g == 0:
                hidden, residual = model.embed(self.input_ids)
            elif self._last_group != g - 1:
                raise RuntimeError(f"layer group {g} launched before group {g - 1}")
            else:
                hidden, residual = self._hand_off
            start, end = self.groups[g]
            hidden, residual = model.layers_forward(hidden, residual, self.batch, start, end)
            if g == len(self.groups) - 1:
                return model.final(hidden, residual, self.batch.logits_indices)
            self._hand_off, self._last_group = (hidden, residual), g
            return hidden


@contextlib.contextmanager
def lane_scope(pset, lane: str):
    """Eager work on ``lane`` of ``pset``: its stream current and kernels sized for its SMs."""
    with pset.use(lane), sm_budget(pset.lane(lane).granted):
        yield
