"""The graph bank: one CUDA graph per (phase, shape bucket, SM split, layer group).

A CUDA graph keeps the SM restriction of the stream it was captured on, and re-masking the
stream it is replayed on changes nothing (tpc-masks.md). So every SM configuration needs its
own capture: we capture ``fn`` on the lane's stream of that split, inside ``sm_budget`` of the
lane's granted SMs so kernels size their grids for the partition they will really run on.
Replay works from any stream; the graph carries its split.

Memory: one private pool per phase (``pool_key``). Graphs of one phase run one after the
other, so they share intermediates; graphs of different phases run concurrently (that is the
point), so they must not. Inputs and outputs live in static buffers the caller owns
(allocated outside the pool), which keeps pool memory reusable across captures.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import time
from typing import Any, Callable, Iterable

from .errors import CaptureError, ClosedError, NoBucketError
from .partition import Partitioner, SMSplit


@dataclasses.dataclass(frozen=True)
class GraphKey:
    phase: str  # e.g. "prefill" or "decode"
    bucket: int  # token count (prefill) or batch size (decode) the static buffers are sized for
    split: SMSplit | None  # None: the whole GPU on an ordinary stream
    lane: str  # which lane of the split the graph runs on
    group: int = 0  # layer group (prefill is captured per group so the split can change between groups)

    def __str__(self) -> str:
        where = f"{self.split.key}:{self.lane}" if self.split else "whole-gpu"
        return f"{self.phase}[{self.bucket}]@{where}/g{self.group}"


@dataclasses.dataclass
class CapturedGraph:
    key: GraphKey
    graph: Any  # torch.cuda.CUDAGraph
    output: Any  # whatever fn returned during capture (static tensors)
    capture_seconds: float

    def replay(self):
        self.graph.replay()
        return self.output


def capture_on_stream(fn: Callable[[], Any], stream, sms: int, pool, warmup: int = 2):
    """Warm ``fn`` up then capture it on ``stream`` with kernels sized for ``sms``.

    Returns ``(graph, output)``. The warm-up runs on the same stream, outside the capture, so
    Triton/Inductor compile and allocate there; the stream first waits for the caller's, so
    inputs made just before are ready. The executable graph is then uploaded on ``stream``
    (:func:`upload_graph`), still inside the caller's lane scope.
    """
    import torch

    from .kernels.sizing import sm_budget

    with sm_budget(sms):
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            output = fn()
        upload_graph(graph, stream)
    stream.synchronize()
    return graph, output


def upload_graph(graph, stream) -> None:
    """Upload a captured graph's executable on ``stream`` now, not at its first replay.

    Two reasons: the first replay then costs what every replay costs, and the tpc backend's
    launch hook writes each kernel's TPC mask when the executable is uploaded; a graph
    uploaded inside a lane's scope keeps that lane's SMs on every later replay, on any stream
    (measured on the H100, driver 580: docs/tpc-masks-h100.md), so replays need no scope.
    """
    from .device import check, driver_module

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


class GraphBank:
    """Captures and replays graphs keyed by :class:`GraphKey`."""

    def __init__(self, partitioner: Partitioner | None = None, device_index: int = 0):
        import torch

        if not torch.cuda.is_available():
            raise CaptureError("CUDA graphs need a GPU; run eagerly (ModelRunner) on this machine")
        self.partitioner = partitioner
        self.device_index = device_index
        self._graphs: dict[GraphKey, CapturedGraph] = {}
        self._pools: dict[str, Any] = {}
        self._whole_gpu_stream = None
        self._closed = False

    def _pool(self, pool_key: str):
        import torch

        if pool_key not in self._pools:
            self._pools[pool_key] = torch.cuda.graph_pool_handle()
        return self._pools[pool_key]

    def stream_for(self, key: GraphKey):
        """The stream a key's graph is captured on: its lane's partition stream."""
        import torch

        if key.split is None:
            # One stream for every whole-GPU capture: the caching allocator keeps warm-up memory
            # per stream, so a fresh stream per capture would strand a pool of blocks each time.
            if self._whole_gpu_stream is None:
                self._whole_gpu_stream = torch.cuda.Stream(self.device_index)
            return self._whole_gpu_stream
        if self.partitioner is None:
            raise CaptureError(f"{key} names a split but this bank has no Partitioner")
        pset = self.partitioner.get(key.split)
        return pset.stream(key.lane)

    def granted_sms(self, key: GraphKey) -> int:
        import torch

        if key.split is None:
            return torch.cuda.get_device_properties(self.device_index).multi_processor_count
        return self.partitioner.get(key.split).lane(key.lane).granted

    def capture(self, key: GraphKey, fn: Callable[[], Any], pool_key: str | None = None, warmup: int = 2) -> CapturedGraph:
        """Run ``fn`` ``warmup`` times then capture it on the key's lane stream."""
        if self._closed:
            raise ClosedError("this GraphBank was closed; create a new one")
        if key in self._graphs:
            return self._graphs[key]
        start = time.perf_counter()
        try:
            # In the lane's scope: the warm-up runs on the lane's SMs and, for tpc hook lanes,
            # the upload writes the lane's mask into the graph for good.
            with self._scope_for(key):
                graph, output = capture_on_stream(
                    fn, self.stream_for(key), self.granted_sms(key), self._pool(pool_key or key.phase), warmup
                )
        except Exception as exc:
            raise CaptureError(
                f"capturing {key} failed: {exc}. Graphs need static shapes, no host syncs "
                "(.item(), .cpu(), printing tensors) and no CPU tensors inside the captured function"
            ) from exc
        captured = CapturedGraph(key, graph, output, time.perf_counter() - start)
        self._graphs[key] = captured
        return captured

    def __contains__(self, key: GraphKey) -> bool:
        return key in self._graphs

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, key: GraphKey) -> CapturedGraph:
        if self._closed:
            raise ClosedError("this GraphBank was closed; create a new one")
        try:
            return self._graphs[key]
        except KeyError:
            near = [str(k) for k in self._graphs if k.phase == key.phase][:8]
            raise KeyError(f"no graph captured for {key}; captured for this phase: {near or 'none'}") from None

    def _scope_for(self, key: GraphKey):
        """The lane scope a key's graph is captured in (see PartitionSet.lane_scope)."""
        if key.split is None or self.partitioner is None:
            return contextlib.nullcontext()
        return self.partitioner.get(key.split).lane_scope(key.lane)

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
