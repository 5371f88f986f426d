"""The graph bank: one CUDA graph per (phase, shape bucket, SM split, lane, layer group).

A CUDA graph keeps the SM restriction of the stream it was captured on, and re-masking the
stream it is replayed on changes nothing (measured on our driver). So every SM configuration
needs its own capture: we capture ``fn`` on the lane's stream of that split, inside
``sm_budget`` of the lane's granted SMs so kernels size their grids for the partition they will
really run on. Replay works from any stream; the graph carries its split. Every capture in the
library goes through :meth:`GraphBank.capture` (model graphs and the ``bullet`` compile backend).

Memory, one pool policy: graphs that may run at the same time must not share a private pool;
graphs that run one after the other should, so they reuse each other's intermediates. The pool
is named by ``pool_key``, by default the key's phase: a phase's graphs replay one after another
(whatever their split), while prefill and decode run concurrently (that is the point). Inputs
and outputs the caller keeps should live in static buffers allocated outside the pool. Every
whole-GPU capture of the process uses one stream (:func:`whole_gpu_stream`).

Kernel-level placement (:mod:`.kernel_lanes`, docs/kernel-placement.md): a decode key with a
``gemm_lane`` is captured on its home lane's stream as usual, but every GEMM is forked to the
GEMM lane's stream inside the same capture and joined back, so the graph's GEMMs keep that
lane's SMs. Allocations on the forked stream during the capture land in the same private pool:
torch's allocator routes an allocation to the capturing graph's pool when the allocating
stream's capture id is the graph's (``CUDAGraph::create_allocate_filter``), and a stream joined
into the capture by an event wait reports that capture's id.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import threading
import time
from typing import Any, Callable, Hashable, Iterable, Sequence

from ..errors import CaptureError, ClosedError, NoBucketError, UnsupportedError
from ..partition import Partitioner, SMSplit
from .graph_check import GraphProbe, GraphVerificationError, LaneExpectation, check_graph_lanes
from .kernel_lanes import GemmFork, backend_refusal, check_gemm_lane, gemms_on
from .placement import Placement


@dataclasses.dataclass(frozen=True)
class GraphKey:
    phase: str  # e.g. "prefill" or "decode"
    bucket: int  # token count (prefill) or batch size (decode) the static buffers are sized for
    split: SMSplit | None  # None: the whole GPU on an ordinary stream
    lane: str  # which lane of the split the graph runs on ("main" for the whole GPU)
    group: int = 0  # layer group (prefill is captured per group so the split can change between groups)
    signature: Hashable = ()  # anything else the graph is specific to (a compiled function's input shapes)
    # Kernel-level placement: the lane the graph's GEMMs run on (None: every kernel on the key's
    # own lane, the home lane). Decode keys of a split's lane only (kernel_lanes.check_gemm_lane).
    gemm_lane: Placement | None = None

    def __post_init__(self) -> None:
        home = Placement(self.split, self.lane)  # refuses a lane the split does not have
        check_gemm_lane(self.phase, home, self.gemm_lane)

    @property
    def placement(self) -> Placement:
        return Placement(self.split, self.lane)

    def __str__(self) -> str:
        extra = f"/{self.signature}" if self.signature != () else ""
        gemm = f"+gemm@{self.gemm_lane}" if self.gemm_lane is not None else ""
        return f"{self.phase}[{self.bucket}]@{self.placement}{gemm}/g{self.group}{extra}"


@dataclasses.dataclass
class CapturedGraph:
    key: GraphKey
    graph: Any  # torch.cuda.CUDAGraph
    output: Any  # whatever fn returned during capture (static tensors)
    capture_seconds: float

    def replay(self):
        self.graph.replay()
        return self.output


@dataclasses.dataclass(frozen=True)
class ForkedLane:
    """Another lane's stream that ``fn`` forks work to inside the capture (kernel placement),
    and what that lane's probe must see (None: the capture is not verified)."""

    stream: Any
    check: LaneExpectation | None = None


def capture_on_stream(fn: Callable[[], Any], stream, sms: int, pool, warmup: int = 2, check_lane=None,
                      name: str = "graph", forked: Sequence[ForkedLane] = ()):
    """Warm ``fn`` up then capture it on ``stream`` with kernels sized for ``sms``.

    Returns ``(graph, output)``. The warm-up runs on the same stream, outside the capture, so
    Triton/Inductor compile and allocate there; the stream first waits for the caller's, so
    inputs made just before are ready. The executable graph is then uploaded on ``stream``
    (:func:`upload_graph`), still inside the caller's lane scope.

    With ``check_lane`` (a :class:`~.graph_check.LaneExpectation`) a ``%smid`` probe node is
    captured at the head of the graph, read after one replay, checked, then disabled
    (:mod:`.graph_check`); a graph that escapes its lane raises GraphVerificationError.

    ``forked``: the other lanes' streams ``fn`` forks to and joins back from (kernel-level
    placement); with ``check_lane`` each gets its own probe, forked onto its stream right after
    the home probe inside the same capture and checked against its own expectation.
    """
    import torch

    from ..kernels.sizing import sm_budget

    if check_lane is not None and any(f.check is None for f in forked):
        raise ValueError(f"{name}: a verified capture needs an expectation for every forked lane")
    with sm_budget(sms):
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        stream.synchronize()  # forked streams joined back into this one: their work is done too
        probes: list[tuple[GraphProbe, LaneExpectation]] = []
        if check_lane is not None:
            device_index = stream.device.index or 0
            probes = [(GraphProbe(s, lane.sm_count, device_index), lane)
                      for s, lane in [(stream, check_lane), *((f.stream, f.check) for f in forked)]]
        graph_probe = probes[0][0] if probes else None
        # keep_graph: the probe nodes are disabled in the executable after the first replay.
        graph = torch.cuda.CUDAGraph(keep_graph=graph_probe is not None)
        # cuBLAS workspaces: torch keeps one per (handle, stream), allocated on first use. One
        # allocated before the capture would live outside the graph's pool, shared with eager
        # work and freed under the graph by anyone who clears the workspaces (Inductor's
        # cudagraph trees do, before recording): a replay then writes freed memory. Cleared
        # here, the capture allocates its workspace in its own pool; cleared again after, no
        # eager cuBLAS call reuses that pool memory (PyTorch's cudagraph trees do the same).
        torch._C._cuda_clearCublasWorkspaces()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            if graph_probe is not None:
                graph_probe.add()
            for side, _ in probes[1:]:  # fork each other lane's probe after the home probe, join back
                side.stream.wait_stream(stream)
                side.add()
                stream.wait_stream(side.stream)
            output = fn()
        torch._C._cuda_clearCublasWorkspaces()
        if graph_probe is not None:
            graph.instantiate()
        upload_graph(graph, stream)
        if graph_probe is not None:
            with torch.cuda.stream(stream):
                graph.replay()
            stream.synchronize()
            check_graph_lanes(name, [(p.observed(), lane) for p, lane in probes])
            for p, _ in probes:
                p.disable(graph)
            upload_graph(graph, stream)  # the executable changed: upload it again in the lane scope
    stream.synchronize()
    return graph, output


def upload_graph(graph, stream) -> None:
    """Upload a captured graph's executable on ``stream`` now, not at its first replay.

    Two reasons: the first replay then costs what every replay costs, and the tpc backend's
    launch hook writes each kernel's TPC mask when the executable is uploaded; a graph
    uploaded inside a lane's scope keeps that lane's SMs on every later replay, on any stream
    (measured on the H100, driver 580), so replays need no scope.
    """
    from ..device import check, driver_module

    drv = driver_module()
    handle = stream.cuda_stream if hasattr(stream, "cuda_stream") else int(stream)
    exec_handle = drv.CUgraphExec(int(graph.raw_cuda_graph_exec()))  # torch >= 2.11, our floor
    check(drv.cuGraphUpload(exec_handle, drv.CUstream(handle)), "cuGraphUpload")


def pick_bucket(buckets: Iterable[int], n: int, what: str) -> int:
    """Smallest bucket >= n; a clear error when n is outside every bucket."""
    ordered = sorted(set(buckets))
    if n <= 0:
        raise ValueError(f"{what} must be positive, got {n}")
    i = bisect.bisect_left(ordered, n)
    if not ordered:
        raise NoBucketError(f"no {what} buckets were captured")
    if i == len(ordered):
        raise NoBucketError(
            f"{what} {n} is larger than every captured bucket (largest {ordered[-1]}); "
            f"captured: {ordered}. Capture a larger bucket or split the work"
        )
    return ordered[i]


def default_buckets(largest: int, smallest: int = 1) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, every 16 up to 256, then powers of two (nano-vllm-like)."""
    out = [b for b in (1, 2, 4) if smallest <= b <= largest]
    b = 8
    while b <= largest:
        out.append(b)
        b += 8 if b < 64 else 16 if b < 256 else b
    if out and out[-1] != largest:
        out.append(largest)
    return sorted(set(x for x in out if x >= smallest))


def _with_gemms(fn: Callable[[], Any], fork: GemmFork) -> Callable[[], Any]:
    """``fn`` with every ``kernels.linear`` forked to the GEMM lane (warm-up and capture alike)."""

    def placed():
        with gemms_on(fork):
            return fn()

    return placed


_whole_gpu_streams: dict[int, Any] = {}
_streams_lock = threading.Lock()


def whole_gpu_stream(device_index: int):
    """The one stream every whole-GPU capture of the process runs on, per device.

    The caching allocator keeps warm-up memory per stream, so a fresh stream per capture (or
    per bank) would strand a pool of blocks each time.
    """
    import torch

    with _streams_lock:
        if device_index not in _whole_gpu_streams:
            _whole_gpu_streams[device_index] = torch.cuda.Stream(device_index)
        return _whole_gpu_streams[device_index]


class GraphBank:
    """Captures and replays graphs keyed by :class:`GraphKey`.

    ``partitioner`` opens the split a key names (None: this bank captures whole-GPU graphs only).
    ``verify_graphs`` (default: as the partitioner verifies its lanes) checks every captured
    graph once with a probe node (:mod:`.graph_check`); replays pay nothing for it.
    """

    def __init__(
        self, partitioner: Partitioner | None = None, device_index: int | None = None, verify_graphs: bool | None = None
    ):
        import torch

        if not torch.cuda.is_available():
            raise CaptureError("CUDA graphs need a GPU; run eagerly (ModelRunner.forward does) on this machine")
        self.partitioner = partitioner
        self.device_index = torch.cuda.current_device() if device_index is None else device_index
        self.verify_graphs = (partitioner is None or partitioner.verify) if verify_graphs is None else verify_graphs
        self._graphs: dict[GraphKey, CapturedGraph] = {}
        self._pools: dict[Hashable, Any] = {}
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this GraphBank was closed; create a new one")

    def _pool(self, pool_key: Hashable):
        import torch

        if pool_key not in self._pools:
            self._pools[pool_key] = torch.cuda.graph_pool_handle()
        return self._pools[pool_key]

    def _partition_set(self, key: GraphKey, split: SMSplit | None = None):
        if self.partitioner is None:
            raise CaptureError(f"{key} names a split but this bank has no Partitioner: create GraphBank(partitioner)")
        return self.partitioner.get(key.split if split is None else split)

    def stream_for(self, key: GraphKey):
        """The stream a key's graph is captured on: its lane's partition stream."""
        return self._lane_stream(key, key.placement)

    def granted_sms(self, key: GraphKey) -> int:
        return self._lane_granted(key, key.placement)

    def lane_expectation(self, key: GraphKey) -> LaneExpectation:
        """The SMs a graph of ``key`` may run on: its lane's verified SMs (all of them whole-GPU)."""
        return self._lane_expectation(key, key.placement)

    def _lane_stream(self, key: GraphKey, where: Placement):
        if where.split is None:
            return whole_gpu_stream(self.device_index)
        return self._partition_set(key, where.split).stream(where.lane)

    def _lane_granted(self, key: GraphKey, where: Placement) -> int:
        import torch

        if where.split is None:
            return torch.cuda.get_device_properties(self.device_index).multi_processor_count
        return self._partition_set(key, where.split).lane(where.lane).granted

    def _lane_expectation(self, key: GraphKey, where: Placement, role: str = "") -> LaneExpectation:
        import torch

        sm_count = torch.cuda.get_device_properties(self.device_index).multi_processor_count
        if where.split is None:
            return LaneExpectation(f"whole-gpu{role}", sm_count, frozenset(range(sm_count)), sm_count)
        lane = self._partition_set(key, where.split).lane(where.lane)
        allowed = lane.expected_sms or lane.observed_sms or None  # None: the lane was opened unverified
        return LaneExpectation(f"{where}{role}", lane.granted, allowed, sm_count)

    def check_kernel_placement(self, key: GraphKey) -> None:
        """Refuse a key's GEMM lane before its graph is captured, saying what was wrong and what to
        do: its split not open in this bank's Partitioner, or a backend whose lanes cannot place
        single kernels (:func:`~.kernel_lanes.backend_refusal`; asking may open the key's home
        split). Nothing to check without a GEMM lane."""
        if key.gemm_lane is None:
            return
        gemm_lane = key.gemm_lane
        if gemm_lane.split is not None:
            opened = self.partitioner is not None and any(
                s.split == gemm_lane.split and not s.closed for s in self.partitioner.open_sets())
            if not opened:
                raise CaptureError(
                    f"{key}: the GEMM lane's split {gemm_lane.split.key} is not open in this bank's Partitioner. "
                    "Open it up front, before other GPU work (EngineConfig.splits or partitioner.get(split)): "
                    "a green lane opened beside used lanes of other splits may run on fewer SMs than granted (docs/green-contexts.md)"
                )
        needs_scope = self._partition_set(key).needs_scope or (
            gemm_lane.split is not None and self._partition_set(key, gemm_lane.split).needs_scope)
        refusal = backend_refusal(self.partitioner.backend.name, needs_scope)
        if refusal:
            raise UnsupportedError(f"{key}: kernel-level placement refused: {refusal}")

    def _gemm_fork(self, key: GraphKey) -> tuple[GemmFork | None, tuple[ForkedLane, ...]]:
        """The GEMM runner and forked lane of a key with kernel placement (checked first)."""
        if key.gemm_lane is None:
            return None, ()
        self.check_kernel_placement(key)
        gemm_lane = key.gemm_lane
        stream = self._lane_stream(key, gemm_lane)
        check = self._lane_expectation(key, gemm_lane, " (GEMM lane)") if self.verify_graphs else None
        return GemmFork(stream, self._lane_granted(key, gemm_lane)), (ForkedLane(stream, check),)

    def _scope_for(self, key: GraphKey):
        """The lane scope a key's graph is captured in (see PartitionSet.lane_scope)."""
        if key.split is None:
            return contextlib.nullcontext()
        return self._partition_set(key).lane_scope(key.lane)

    def capture(
        self, key: GraphKey, fn: Callable[[], Any], pool_key: Hashable | None = None, warmup: int = 2
    ) -> CapturedGraph:
        """Run ``fn`` ``warmup`` times then capture it on the key's lane stream (once per key).

        ``pool_key`` names the memory pool (default: the key's phase); see the module docstring.
        """
        self._check_open()
        if key in self._graphs:
            return self._graphs[key]
        fork, forked = self._gemm_fork(key)
        if fork is not None:
            fn = _with_gemms(fn, fork)
        start = time.perf_counter()
        try:
            # Everything that must see the lane's SMs happens inside its scope: the warm-up,
            # the capture and the upload (for tpc hook lanes the upload writes the lane's mask
            # into the graph for good), and any check of the uploaded graph.
            with self._scope_for(key):
                graph, output = capture_on_stream(
                    fn, self.stream_for(key), self.granted_sms(key), self._pool(pool_key or key.phase), warmup,
                    check_lane=self.lane_expectation(key) if self.verify_graphs else None, name=str(key),
                    forked=forked,
                )
                captured = CapturedGraph(key, graph, output, time.perf_counter() - start)
        except GraphVerificationError:
            raise  # already names the lane, the SMs asked and the SMs seen
        except Exception as exc:
            raise CaptureError(
                f"capturing {key} failed: {exc}. Graphs need static shapes, no host syncs "
                "(.item(), .cpu(), printing tensors) and no CPU tensors inside the captured function"
            ) from exc
        if fork is not None and fork.calls == 0:  # nothing was placed: a plain graph under another name
            raise CaptureError(f"{key} names a GEMM lane but its function ran no kernels.linear GEMM")
        self._graphs[key] = captured
        return captured

    def __contains__(self, key: GraphKey) -> bool:
        return key in self._graphs

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, key: GraphKey) -> CapturedGraph:
        self._check_open()
        try:
            return self._graphs[key]
        except KeyError:
            near = [str(k) for k in self._graphs if k.phase == key.phase][:8]
            raise KeyError(f"no graph captured for {key}; captured for this phase: {near or 'none'}") from None

    def replay(self, key: GraphKey, stream=None):
        """Replay on ``stream`` (default: the current stream). Returns the static output."""
        import torch

        g = self.get(key)
        if stream is None:
            return g.replay()
        with torch.cuda.stream(stream):
            return g.replay()

    def keys(self) -> list[GraphKey]:
        return list(self._graphs)

    def release(self, where: Callable[[GraphKey], bool] | None = None) -> int:
        """Drop the graphs whose key matches ``where`` (all by default); returns how many.

        Their pool memory goes back to the caching allocator once no graph uses it.
        """
        self._check_open()
        dropped = [k for k in self._graphs if where is None or where(k)]
        for k in dropped:
            del self._graphs[k]
        return len(dropped)

    def stats(self) -> dict:
        import torch

        return {
            "graphs": len(self._graphs),
            "capture_seconds": sum(g.capture_seconds for g in self._graphs.values()),
            "memory_reserved_bytes": torch.cuda.memory_reserved(self.device_index),
        }

    def close(self) -> None:
        if self._closed:
            raise ClosedError("this GraphBank was already closed; close it once")
        self._closed = True
        self._graphs.clear()
        self._pools.clear()
