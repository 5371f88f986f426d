"""Every captured graph is checked once: does each of its lanes run on that lane's SMs?

Verifying a lane when it opens is not enough: we measured a green lane whose kernels ran on an
earlier lane's SMs after other work in the process (docs/green-contexts.md). So the graph bank
captures a ``%smid`` probe node at the head of every graph, on the same stream, in the same lane
scope and capture as the graph's own kernels. After the first replay the probe's output says
which SMs the graph ran on; a graph that escapes its lane is refused with the lane, the SMs
asked and the SMs seen. The probe node is then disabled in the executable (a disabled node is
an empty node), so later replays pay nothing for it.

A graph with kernel-level placement (:mod:`.kernel_lanes`) uses two lanes: its home lane and
the lane its GEMMs are forked to. Each lane is checked once: a probe at the head of the home
stream and one forked onto the GEMM lane's stream in the same capture, each read against its own
lane's expectation (:func:`check_graph_lanes`), both disabled after.

:func:`check_graph_sms` / :func:`check_graph_lanes` are the pure decision (tested on CPU with
simulated probe results); :class:`GraphProbe` does the driver work.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ..errors import CaptureError
from ..partition.base import format_ranges


class GraphVerificationError(CaptureError):
    """A captured graph ran (some of) its kernels outside its lane's SMs; it is never used."""


@dataclasses.dataclass(frozen=True)
class LaneExpectation:
    """What a graph of one lane may use: ``granted`` SMs, all within ``allowed`` when known."""

    where: str  # "prefill96-decode36:prefill" or "whole-gpu"
    granted: int
    allowed: frozenset[int] | None  # the lane's verified SMs; None where the lane was not probed
    sm_count: int


def check_graph_sms(graph_name: str, observed: frozenset[int], lane: LaneExpectation) -> None:
    """Raise :class:`GraphVerificationError` unless ``observed`` keeps the lane's promise."""
    problems = []
    outside = sorted(sm for sm in observed if not 0 <= sm < lane.sm_count)
    if outside:
        problems.append(f"SM ids {outside[:8]} outside 0..{lane.sm_count - 1}")
    if lane.allowed is not None:
        escaped = sorted(observed - lane.allowed)
        if escaped:
            problems.append(
                f"ran on SMs {format_ranges(escaped)} outside the lane's {len(lane.allowed)} "
                f"({format_ranges(sorted(lane.allowed))})"
            )
    if len(observed) != lane.granted:
        problems.append(f"ran on {len(observed)} SMs, not the {lane.granted} granted")
    if problems:
        raise GraphVerificationError(
            f"graph {graph_name} on lane {lane.where} failed verification: " + "; ".join(problems)
            + f" (observed {format_ranges(sorted(observed))}). Refusing to use it; see "
            "docs/green-contexts.md (open every split before other GPU work) or try backend='tpc'"
        )


def check_graph_lanes(graph_name: str, seen: Sequence[tuple[frozenset[int], LaneExpectation]]) -> None:
    """Check each lane a graph uses: ``(observed SMs, that lane's expectation)`` per probe, home
    lane first. The first lane that escapes raises, naming that lane, its SMs asked and seen."""
    if not seen:
        raise ValueError(f"graph {graph_name}: no probe results to check (one per lane the graph uses)")
    for observed, lane in seen:
        check_graph_sms(graph_name, observed, lane)


class GraphProbe:
    """The probe node of one capture: :meth:`add` inside the capture, :meth:`read_and_disable` after."""

    def __init__(self, stream, sm_count: int, device_index: int, waves: int = 4, spin_us: int = 20):
        import torch

        self.stream = stream
        # Allocated before the capture, outside its pool: the graph writes here once.
        self.out = torch.full((waves * sm_count,), -1, dtype=torch.int32, device=f"cuda:{device_index}")
        self.device_index = device_index
        self.spin_us = spin_us
        self.node = None
        # One launch outside the capture resolves the probe kernel in the stream's context, so
        # nothing is loaded while capturing (module loads are not capture-safe).
        from ..partition import probe

        torch.cuda.synchronize(device_index)
        probe.launch_probe(stream, self.out, spin_us, device_index)
        stream.synchronize()
        self.out.fill_(-1)
        torch.cuda.synchronize(device_index)

    def add(self) -> None:
        """Launch the probe into the capture running on ``stream``; remember its node."""
        from ..device import check, driver_module
        from ..partition import probe

        drv = driver_module()
        probe.launch_probe(self.stream, self.out, self.spin_us, self.device_index)
        handle = drv.CUstream(self.stream.cuda_stream)
        info = check(drv.cuStreamGetCaptureInfo(handle), "cuStreamGetCaptureInfo")
        status, deps = info[0], info[3]
        if status != drv.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_ACTIVE or len(deps) != 1:
            raise CaptureError(f"the graph probe expected an active capture with one tail node, got {status}, {len(deps)}")
        self.node = deps[0]

    def observed(self) -> frozenset[int]:
        """The SMs the probe ran on in the first replay (the caller synchronised)."""
        from ..partition import probe

        return probe.sms_written(self.out)

    def disable(self, graph) -> None:
        """Turn the probe node into an empty node of the executable: zero cost on later replays."""
        from ..device import check, driver_module

        drv = driver_module()
        exec_handle = drv.CUgraphExec(int(graph.raw_cuda_graph_exec()))
        check(drv.cuGraphNodeSetEnabled(exec_handle, self.node, 0), "cuGraphNodeSetEnabled(probe node)")
