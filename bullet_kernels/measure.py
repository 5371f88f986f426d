"""Measuring on the GPU: CUDA-event timing, measured peaks, and NVML clock and power samples.

Benchmarks (``bench/``), ``bullet sweep`` and the profiler take every number the same way:

- :class:`EventTimer` times a callable with CUDA events on one stream and keeps every per-call
  sample (:func:`time_stats`: median, p10, p90); :class:`HostTimer` is the wall-clock twin for
  what a serving loop sees; :func:`capture_graph` turns a list of calls into one CUDA graph.
- :func:`measured_peaks` measures bf16 GEMM TFLOP/s and copy TB/s on the *current* stream, so
  inside ``pset.use(lane)`` it gives that lane's peaks (a partition's roofline is not N/132 of
  the GPU's: forty SMs move most of the GPU's bandwidth). :func:`roofline_fields` puts a
  measured time against ``max(bytes / bandwidth, flops / peak)``.
- :class:`GpuMonitor` samples SM clock, power and the clock-event (throttle) reasons through
  NVML while a block runs: at the 700 W cap of an H200 the SM clock falls from 1980 to about
  1600 MHz, so every measurement records them. NVML comes from ``nvidia-ml-py`` (imported
  lazily); without it, or without a GPU, the fields say ``"unavailable"`` instead of failing.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import threading
import time
from typing import Any, Callable, Sequence

UNAVAILABLE = "unavailable"

# ------------------------------------------------------------------------ statistics (pure)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), interpolating linearly between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty sequence: time at least one call")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in 0..100, got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_stats(times_ms: Sequence[float]) -> dict:
    """Summary of per-call times (ms), raw samples included (design: keep more than means)."""
    return {
        "median_ms": percentile(times_ms, 50),
        "p10_ms": percentile(times_ms, 10),
        "p90_ms": percentile(times_ms, 90),
        "min_ms": min(times_ms),
        "mean_ms": statistics.fmean(times_ms),
        "reps": len(times_ms),
        "samples_ms": [round(t, 5) for t in times_ms],
    }


# ------------------------------------------------------------------------------------ timing


class Timer:
    """Collects per-call times (ms) over rounds. :meth:`round` is what pytest-benchmark's
    ``benchmark.pedantic`` calls: it returns only when the GPU has finished the round's work,
    so the host time pytest-benchmark takes covers the same work as the samples kept here."""

    def __init__(self, fn: Callable[[], Any], calls_per_round: int = 1, units: int = 1):
        if calls_per_round < 1 or units < 1:
            raise ValueError(f"calls_per_round and units must be >= 1, got {calls_per_round}, {units}")
        self.fn = fn
        self.calls_per_round = calls_per_round
        self.units = units  # work units in one call (a graph of 32 layers -> per-layer times)
        self.times_ms: list[float] = []

    def round(self) -> None:
        raise NotImplementedError

    def warmup(self, rounds: int = 1) -> None:
        """Run ``rounds`` rounds and forget their times (compilation, autotuning, caches)."""
        for _ in range(rounds):
            self.round()
        self.times_ms.clear()

    def run(self, rounds: int) -> dict:
        for _ in range(rounds):
            self.round()
        return self.stats()

    def stats(self) -> dict:
        return time_stats(self.times_ms)


class EventTimer(Timer):
    """Times ``fn`` with CUDA events on ``stream`` (default: the stream current at each round).

    A round enqueues ``calls_per_round`` calls back to back, each between two events, and waits
    once at the end: only the first call of a round can see the host's launch latency.
    """

    def __init__(self, fn, stream=None, calls_per_round: int = 1, units: int = 1):
        super().__init__(fn, calls_per_round, units)
        self.stream = stream

    def round(self) -> None:
        import torch

        stream = self.stream if self.stream is not None else torch.cuda.current_stream()
        events = []
        with torch.cuda.stream(stream):
            for _ in range(self.calls_per_round):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                self.fn()
                end.record(stream)
                events.append((start, end))
        events[-1][1].synchronize()
        self.times_ms += [s.elapsed_time(e) / self.units for s, e in events]


class HostTimer(Timer):
    """Wall time per call with the GPU drained before and after: what a serving loop sees."""

    def round(self) -> None:
        import torch

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(self.calls_per_round):
            self.fn()
        torch.cuda.synchronize()
        self.times_ms.append((time.perf_counter() - t0) * 1e3 / (self.calls_per_round * self.units))


def capture_graph(calls: Sequence[Callable[[], Any]], stream):
    """One CUDA graph that runs ``calls`` in order, captured on ``stream``.

    The calls run once eagerly first (Triton compiles, cuBLAS picks its kernels), and the graph
    is replayed once before it is returned, so call it inside ``pset.use(lane)`` where a lane
    needs its scope (tpc hook lanes fix their mask when the graph is uploaded). The stream
    first waits for the current one: a partition's stream is non-blocking, and inputs made just
    before on the default stream must be written before a kernel reads them. Replay it with
    ``EventTimer(graph.replay, stream, units=len(calls))`` for per-call times.
    """
    import torch

    if not calls:
        raise ValueError("capture_graph needs at least one call")
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:
            fn()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for fn in calls:
            fn()
    with torch.cuda.stream(stream):
        graph.replay()  # the first launch uploads the graph: inside a tpc lane's scope, its mask sticks
    stream.synchronize()
    return graph


# ------------------------------------------------------------------------------------- peaks

try:  # triton is a dependency; measuring must still import where it does not load
    import triton
    import triton.language as tl

    @triton.jit
    def persistent_copy_kernel(src, dst, n, BLOCK: tl.constexpr):
        start = tl.program_id(0) * BLOCK
        step = tl.num_programs(0) * BLOCK
        for offset in range(start, n, step):
            idx = offset + tl.arange(0, BLOCK)
            mask = idx < n
            tl.store(dst + idx, tl.load(src + idx, mask=mask), mask=mask)

except Exception:  # pragma: no cover - depends on the install
    persistent_copy_kernel = None


def persistent_copy(src, dst, programs: int, block: int = 4096) -> None:
    """Copy ``src`` into ``dst`` (same numel, contiguous) with ``programs`` looping programs.

    torch's ``copy_`` sizes its grid for the whole GPU; a grid of a few programs per SM of a
    partition draws more of what the partition can move, so it is the fairer reference there.
    """
    if persistent_copy_kernel is None:
        raise RuntimeError("persistent_copy needs triton, which did not import")
    if src.numel() != dst.numel() or not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("persistent_copy needs contiguous src and dst of the same numel")
    if programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    persistent_copy_kernel[(programs,)](src, dst, src.numel(), BLOCK=block, num_warps=8)


def copy_tbps(nbytes: int = 1 << 30, reps: int = 10, sms: int | None = None) -> dict:
    """Copy bandwidth (bytes read + written) on the current stream, TB/s.

    The faster of torch's ``copy_`` and :func:`persistent_copy` with 4 programs per SM of
    ``sms`` (default: the current ``sm_budget``). fp32 elements: the copy moves 16-byte
    vectors (a byte copy is slower on few SMs and would flatter what is measured against it).
    """
    import torch

    from .kernels.sizing import current_sm_budget

    programs = 4 * (sms or current_sm_budget())
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    moved = 2 * src.nbytes
    out = {}
    for impl, fn in (("torch", lambda: dst.copy_(src)), ("persistent", lambda: persistent_copy(src, dst, programs))):
        timer = EventTimer(fn, calls_per_round=reps)
        timer.warmup()
        out[f"copy_{impl}_tbps"] = moved / (timer.run(1)["median_ms"] * 1e-3) / 1e12
    best = max(("torch", "persistent"), key=lambda impl: out[f"copy_{impl}_tbps"])
    return {"copy_tbps": out[f"copy_{best}_tbps"], "copy_impl": best, **out}


def gemm_tflops(n: int = 8192, reps: int = 10) -> dict:
    """bf16 ``n x n x n`` GEMM (cuBLAS) throughput on the current stream, TFLOP/s.

    Random inputs, not zeros: the power a GEMM draws (and so the clock it runs at) depends on
    the data. cuBLAS picks its kernels for the whole GPU; on a partition this is what cuBLAS
    reaches there, not the partition's ideal peak.
    """
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    timer = EventTimer(lambda: torch.mm(a, b, out=c), calls_per_round=reps)
    timer.warmup()
    return {"gemm_tflops": 2 * n**3 / (timer.run(1)["median_ms"] * 1e-3) / 1e12, "gemm_n": n}


def measured_peaks(sms: int | None = None) -> dict:
    """GEMM TFLOP/s and copy TB/s on the current stream, launches sized for ``sms`` SMs.

    Call inside ``pset.use(lane)`` for a lane's peaks (and pass its granted SMs), outside for
    the whole GPU's.
    """
    import contextlib

    from .kernels.sizing import sm_budget

    with sm_budget(sms) if sms else contextlib.nullcontext():
        return {**gemm_tflops(), **copy_tbps(sms=sms)}


def roofline_ms(nbytes: float, flops: float, peaks: dict) -> float:
    """The least time the work can take on hardware with these peaks: ``max(bytes / bw, flops / peak)``."""
    return 1e3 * max(nbytes / (peaks["copy_tbps"] * 1e12), flops / (peaks["gemm_tflops"] * 1e12))


def roofline_fields(median_ms: float, nbytes: float, flops: float, peaks: dict) -> dict:
    """Row fields for a measured time against its roofline (``peaks`` of the lane it ran on)."""
    if median_ms <= 0:
        raise ValueError(f"a measured time must be positive, got {median_ms} ms")
    memory_ms = 1e3 * nbytes / (peaks["copy_tbps"] * 1e12)
    compute_ms = 1e3 * flops / (peaks["gemm_tflops"] * 1e12)
    roof = max(memory_ms, compute_ms)
    return {
        "bytes": nbytes,
        "flops": flops,
        "tbps": nbytes / (median_ms * 1e-3) / 1e12,
        "tflops": flops / (median_ms * 1e-3) / 1e12,
        "lane_copy_tbps": peaks["copy_tbps"],
        "lane_gemm_tflops": peaks["gemm_tflops"],
        "roofline_ms": roof,
        "bound": "memory" if memory_ms >= compute_ms else "compute",
        "pct_of_roofline": 100 * roof / median_ms,
    }


# -------------------------------------------------------------------------------------- NVML

# nvmlClocksEventReason* bits (called throttle reasons before NVML 12.x; same values).
CLOCK_EVENT_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


def clock_event_reasons(mask: int) -> list[str]:
    """Names of the reasons set in an NVML clock-event (throttle) bit mask; unknown bits as hex."""
    if mask < 0:
        raise ValueError(f"a clock-event mask is a non-negative bit mask, got {mask}")
    names = [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]
    rest = mask & ~sum(CLOCK_EVENT_REASONS)
    return names + ([hex(rest)] if rest else [])


def unavailable_fields(reason: str) -> dict:
    """What a row says about clocks and power where NVML cannot tell."""
    return {
        "sm_clock_mhz": UNAVAILABLE,
        "power_w": UNAVAILABLE,
        "throttle_reasons": UNAVAILABLE,
        "nvml": f"{UNAVAILABLE}: {reason}",
    }


def summarize_samples(samples: Sequence[dict], energy_j: float | None = None, seconds: float | None = None) -> dict:
    """Row fields from NVML samples ``{"sm_clock_mhz", "power_w", "reasons"}`` taken during a block.

    ``throttle_reasons`` maps each clock-event reason to the share of samples it was active in
    (``gpu_idle`` shows gaps between launches). ``energy_power_w`` is the mean power from the
    energy counter over the block (the power reading itself is averaged by the driver over up to
    a second, so short blocks should trust the energy figure).
    """
    if not samples:
        return unavailable_fields("no NVML sample was taken")
    clocks = [s["sm_clock_mhz"] for s in samples]
    power = [s["power_w"] for s in samples]
    shares: dict[str, float] = {}
    for s in samples:
        for name in clock_event_reasons(s["reasons"]):
            shares[name] = shares.get(name, 0) + 1 / len(samples)
    out = {
        "sm_clock_mhz": statistics.median(clocks),
        "sm_clock_mhz_min": min(clocks),
        "sm_clock_mhz_max": max(clocks),
        "power_w": statistics.median(power),
        "power_w_max": max(power),
        "throttle_reasons": {k: round(v, 3) for k, v in sorted(shares.items())},
        "nvml_samples": len(samples),
    }
    if energy_j is not None and seconds:
        out["energy_power_w"] = energy_j / seconds
    return out


@functools.lru_cache(maxsize=None)
def nvml_device(index: int = 0) -> tuple[Any, Any]:
    """``(pynvml, handle)`` for torch's CUDA device ``index``, or ``(None, reason)``.

    The handle is found by UUID, so a ``CUDA_VISIBLE_DEVICES`` that reorders GPUs is honoured
    (NVML numbers every GPU of the machine). Cached; ``nvml_device.cache_clear()`` retries.
    """
    try:
        import pynvml
    except ImportError as exc:
        return None, f"nvidia-ml-py is not installed ({exc}); pip install nvidia-ml-py"
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return None, f"NVML did not initialise: {exc}"
    try:
        import torch

        if not torch.cuda.is_initialized() and os.environ.get("CUDA_VISIBLE_DEVICES") is None:
            # NVML numbers GPUs as CUDA does here; no CUDA context just to find the handle (a
            # load generator beside a server should not take GPU memory).
            return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        return pynvml, pynvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception as exc:
        if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
            return None, f"no NVML device for CUDA device {index} ({exc}) with CUDA_VISIBLE_DEVICES set"
    try:
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception as exc:
        return None, f"no NVML device {index}: {exc}"


def gpu_limits(index: int = 0) -> dict:
    """Run-level facts: the enforced power limit (W) and the maximum SM clock (MHz)."""
    nvml, handle = nvml_device(index)
    if nvml is None:
        return {"power_limit_w": UNAVAILABLE, "sm_clock_max_mhz": UNAVAILABLE, "nvml": f"{UNAVAILABLE}: {handle}"}
    out: dict[str, Any] = {}
    for key, read in (("power_limit_w", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3),
                      ("sm_clock_max_mhz", lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM))):
        try:
            out[key] = read()
        except Exception as exc:  # a field this GPU or driver does not report
            out[key] = f"{UNAVAILABLE}: {exc}"
    return out


class GpuMonitor:
    """Samples SM clock, power and clock-event reasons every ``interval_s`` while a block runs.

    >>> with GpuMonitor() as gpu:
    ...     timer.run(20)
    >>> row.update(gpu.summary())

    A background thread takes the samples (NVML calls do not touch CUDA streams), plus one at
    entry and one at exit, so a short block still gets two.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.01):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.device_index = device_index
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self.error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._energy0 = self._t0 = None
        self._energy_j = self._seconds = None

    def _sample(self) -> None:
        nvml, handle = self._nvml
        try:
            reasons_fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
                nvml.nvmlDeviceGetCurrentClocksThrottleReasons
            self.samples.append({
                "t": time.perf_counter(),
                "sm_clock_mhz": nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
                "power_w": nvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
                "reasons": reasons_fn(handle),
            })
        except Exception as exc:  # stop sampling, say why in the summary
            self.error = f"NVML sample failed: {exc}"
            self._stop.set()

    def _energy_mj(self) -> float | None:
        nvml, handle = self._nvml
        try:
            return nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except Exception:  # older GPUs have no energy counter
            return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "GpuMonitor":
        self._nvml = nvml_device(self.device_index)
        if self._nvml[0] is None:
            self.error = self._nvml[1]
            return self
        self._energy0, self._t0 = self._energy_mj(), time.perf_counter()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="bullet-gpu-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        if not self.error:
            self._sample()
        energy1 = self._energy_mj()
        self._seconds = time.perf_counter() - self._t0
        if self._energy0 is not None and energy1 is not None:
            self._energy_j = (energy1 - self._energy0) / 1e3

    def summary(self) -> dict:
        if self.error and not self.samples:
            return unavailable_fields(self.error)
        out = summarize_samples(self.samples, self._energy_j, self._seconds)
        if self.error:
            out["nvml"] = self.error
        return out
