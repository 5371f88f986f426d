"""The orchestrator: issues a plan's launches on two concurrent streams, joined by events.

One stream per phase. A launch replays graphs captured for its lane (a graph keeps the SMs it
was captured with, so any stream may replay it); a launch marked ``after_other`` first waits
for the other stream's last launch, which is how the SMs change hands between splits without
two graphs ever sharing an SM. Everything is issued ahead without waiting on the GPU: the host
only enqueues, and :attr:`Run.host_ms_per_launch` says how much host time each launch cost.

    orch = Orchestrator(device)
    run = orch.issue(launches, {"prefill": prefill_fn, "decode": decode_fn})
    run.synchronize(); run.wall_ms, run.lane_ms("decode")

``prefill_fn(index, placement, stream)`` / ``decode_fn(...)`` enqueue one graph (layer group
``index`` of the prefill; decode step ``index``) on ``stream``; the runner's
:class:`~bullet_kernels.engine.Step` objects do exactly that.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import torch

from ..engine.placement import WHOLE_GPU, Placement
from .planner import Launch
from .policy import DECODE, PREFILL

LaunchFn = Callable[[int, Placement, "torch.cuda.Stream"], object]


@dataclasses.dataclass
class Run:
    launches: list[Launch]
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]]  # per launch: start, end
    begin: torch.cuda.Event
    end: torch.cuda.Event
    host_ms: float  # host time spent issuing

    def synchronize(self) -> "Run":
        self.end.synchronize()
        return self

    @property
    def wall_ms(self) -> float:
        return self.begin.elapsed_time(self.end)

    @property
    def host_ms_per_launch(self) -> float:
        return self.host_ms / max(len(self.launches), 1)

    def lane_ms(self, phase: str) -> list[float]:
        """GPU time of each launch of ``phase`` (start to end, queueing behind events excluded)."""
        return [s.elapsed_time(e) for launch, (s, e) in zip(self.launches, self.events) if launch.phase == phase]

    def finish_ms(self, phase: str) -> float:
        """From the run's start to the end of the last launch of ``phase``."""
        ends = [e for launch, (_, e) in zip(self.launches, self.events) if launch.phase == phase]
        return self.begin.elapsed_time(ends[-1]) if ends else 0.0

    def decode_intervals_ms(self) -> list[float]:
        """Time between the ends of consecutive decode steps (the token cadence a user sees);
        the first is from the run's start."""
        ends = [self.begin] + [e for launch, (_, e) in zip(self.launches, self.events) if launch.phase == DECODE]
        return [a.elapsed_time(b) for a, b in zip(ends, ends[1:])]


class Orchestrator:
    def __init__(self, device: torch.device | int | None = None):
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device) \
            if not isinstance(device, torch.device) else device
        self.streams = {PREFILL: torch.cuda.Stream(self.device), DECODE: torch.cuda.Stream(self.device)}

    def issue(self, launches: Sequence[Launch], fns: dict[str, LaunchFn]) -> Run:
        """Enqueue every launch in order; returns at once (``Run.synchronize`` waits)."""
        t0 = time.perf_counter()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(torch.cuda.current_stream(self.device))
        for s in self.streams.values():
            s.wait_event(begin)  # both chains start after the caller's earlier work
        last: dict[str, torch.cuda.Event | None] = {PREFILL: None, DECODE: None}
        events = []
        for launch in launches:
            stream = self.streams[launch.phase]
            other = DECODE if launch.phase == PREFILL else PREFILL
            if launch.after_other and last[other] is not None:
                stream.wait_event(last[other])
            placement = WHOLE_GPU if launch.split is None else Placement(launch.split, launch.phase)
            start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fns[launch.phase](launch.index, placement, stream)
            done.record(stream)
            last[launch.phase] = done
            events.append((start, done))
        caller = torch.cuda.current_stream(self.device)
        for s in self.streams.values():
            caller.wait_stream(s)  # the caller's later work sees both chains' results
        end.record(caller)
        return Run(list(launches), events, begin, end, (time.perf_counter() - t0) * 1e3)
