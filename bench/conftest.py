"""The benchmark suite's shared setup: options, lanes, timing and result files (the GPU skip is
the root conftest.py's).

    python3 -m pytest bench/ -m gpu                          # quick sizes, ~10 min on an H200
    python3 -m pytest bench/ -m gpu --bench-size full --benchmark-json bench/results/pb.json

A benchmark module declares ``BENCHMARK`` (its results file name), ``GRID`` (per size, the
values of each parametrized argument it asks for) and may define ``summarize(rows)``,
``plot(rows, png_path)`` and ``table(rows, summary)``. Its rows go to
``bench/results/<BENCHMARK>-<gpu>-<yyyymmdd>.json`` (the project's schema) when the module ends;
pytest-benchmark keeps its own statistics (``--benchmark-json``).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from bullet_kernels import measure, results, sweep
from bullet_kernels.kernels import sm_budget
from bullet_kernels.partition import BACKENDS, Partitioner, SMSplit

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SIZES = ("quick", "full")
ROUNDS = {"quick": 2, "full": 4}  # pytest-benchmark rounds per measurement
CALLS_PER_ROUND = 5  # graph replays per round, back to back, each between CUDA events
LANE = sweep.LANE  # the lane name of the suite's one-lane splits (shared with the SM sweep)
WRITTEN: list[Path] = []
TABLES: list[tuple[str, str]] = []


def pytest_addoption(parser):
    group = parser.getgroup("bullet bench", "bullet_kernels benchmark suite")
    group.addoption("--bench-size", choices=SIZES, default="quick",
                    help="shape grid: quick (default; the suite fits ~10 min on an H200) or full")
    group.addoption("--bench-backend", choices=BACKENDS, default="green", help="partition backend (default green)")
    group.addoption("--bench-sms", default=None, metavar="N,N,...",
                    help="SM counts replacing each benchmark's own, 'all' for the whole GPU (e.g. 16,32,all)")
    group.addoption("--bench-out", default=str(RESULTS_DIR), metavar="DIR",
                    help=f"folder for the results JSON and PNG (default {RESULTS_DIR})")
    group.addoption("--sglang-model-dir", default=os.environ.get("BULLET_SGLANG_MODEL_DIR"), metavar="DIR",
                    help="model directory for SGLang's bench_one_batch (env BULLET_SGLANG_MODEL_DIR); "
                    "without it test_sglang_compare skips")
    group.addoption("--sglang-pythonpath", default=os.environ.get("BULLET_SGLANG_PYTHONPATH"), metavar="PATH",
                    help="PYTHONPATH under which sglang imports, e.g. an offline wheel set (env BULLET_SGLANG_PYTHONPATH)")


def parse_sms(text: str) -> tuple:
    """``"16,32,all"`` -> ``(16, 32, "all")``."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if item == "all":
            out.append("all")
        elif item.isdigit() and int(item) > 0:
            out.append(int(item))
        else:
            raise pytest.UsageError(f"--bench-sms {text!r}: {item!r} is not a positive SM count or 'all'")
    return tuple(out)


def pytest_configure(config):
    sms = config.getoption("bench_sms", None)
    if sms:
        parse_sms(sms)  # a bad list is a usage error before anything runs


def param_id(name: str, value) -> str:
    if name == "sms":
        return f"sms{value}"
    if isinstance(value, tuple):  # (16, 1024) -> 16x1024; ("attention", "ours") -> attention-ours
        return ("x" if all(isinstance(v, int) for v in value) else "-").join(map(str, value))
    return str(value)


def pytest_generate_tests(metafunc):
    grid = getattr(metafunc.module, "GRID", None)
    if grid is None:
        return
    params = dict(grid[metafunc.config.getoption("bench_size")])
    if metafunc.config.getoption("bench_sms"):
        params["sms"] = parse_sms(metafunc.config.getoption("bench_sms"))
    for name, values in params.items():  # the first name varies slowest
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, values, ids=[param_id(name, v) for v in values])


def pytest_terminal_summary(terminalreporter):
    for benchmark, text in TABLES:
        terminalreporter.write_sep("-", f"bench results: {benchmark}")
        terminalreporter.write_line(text)
    for path in WRITTEN:
        terminalreporter.write_line(f"wrote {path}")


# ------------------------------------------------------------------------------------ lanes


@dataclasses.dataclass
class BenchLane:
    """One lane of a verified partition, and the peaks measured on it."""

    pset: object
    name: str
    sms_asked: object  # an int, or "all"
    peaks_cache: dict

    @property
    def lane(self):
        return self.pset.lane(self.name)

    @property
    def granted(self) -> int:
        return self.lane.granted

    @property
    def stream(self):
        return self.lane.stream

    @contextmanager
    def use(self):
        """Work launched inside runs on this lane, its launches sized for its SMs."""
        with self.pset.use(self.name) as stream, sm_budget(self.granted):
            yield stream

    def peaks(self) -> dict:
        """Copy TB/s and bf16 GEMM TFLOP/s on this lane, measured once per session."""
        key = (self.pset.split, self.name)
        if key not in self.peaks_cache:
            with self.use():
                self.peaks_cache[key] = measure.measured_peaks(self.granted)
        return self.peaks_cache[key]


class Bench:
    """Session-wide: options, one Partitioner, lanes by SM count, and timing helpers."""

    def __init__(self, config):
        self.size = config.getoption("bench_size")
        self.backend = config.getoption("bench_backend")
        self.out_dir = Path(config.getoption("bench_out"))
        self.rounds = ROUNDS[self.size]
        self.full_sms = torch.cuda.get_device_properties(0).multi_processor_count
        self.peaks_cache: dict = {}

    @functools.cached_property
    def partitioner(self) -> Partitioner:
        """The session's one Partitioner (opened on first use; its partitions stay open)."""
        return Partitioner(self.backend)

    def sm_count(self, sms) -> int:
        return self.full_sms if sms == "all" else min(int(sms), self.full_sms)

    def lane(self, sms) -> BenchLane:
        """The lane of a one-lane split of ``sms`` SMs (``"all"``: the whole GPU)."""
        pset = self.partitioner.get(sweep.lane_split(self.sm_count(sms)))
        return BenchLane(pset, LANE, sms, self.peaks_cache)

    def open_splits(self, items) -> list[SMSplit]:
        """Open and verify, before any other GPU work, every split the selected tests name: a
        green split first opened after Inductor or cuBLAS work has run was seen running on an
        earlier split's SMs (docs/green-contexts.md). A test names the one-lane split of its
        ``sms`` parameter, and any split its module's ``splits_of(params)`` returns."""
        splits = []
        for item in items:
            params = item.callspec.params if hasattr(item, "callspec") else {}
            if "sms" in params:
                splits.append(sweep.lane_split(self.sm_count(params["sms"])))
            if hasattr(item.module, "splits_of"):
                splits += item.module.splits_of(params)
        splits = list(dict.fromkeys(splits))
        for split in splits:
            self.partitioner.get(split)
        return splits

    def time_graph(self, benchmark, lane: BenchLane, calls, calls_per_round: int = CALLS_PER_ROUND) -> dict:
        """Capture ``calls`` as one CUDA graph on ``lane`` and replay it under pytest-benchmark.

        Returns per-call CUDA-event statistics (``median_ms``...) and the NVML clock and power
        fields sampled while it ran; the same figures go to pytest-benchmark's extra_info.
        """
        torch.cuda.synchronize()  # an error of earlier asynchronous work surfaces here, not below
        with lane.use() as stream:
            graph = measure.capture_graph(calls, stream)
        timer = measure.EventTimer(graph.replay, lane.stream, calls_per_round=calls_per_round, units=len(calls))
        timer.warmup()
        with measure.GpuMonitor() as gpu:
            benchmark.pedantic(timer.round, rounds=self.rounds)
        out = {"sms_asked": lane.sms_asked, "sms": lane.granted, **timer.stats(), **gpu.summary()}
        benchmark.extra_info.update({k: v for k, v in out.items() if isinstance(v, (int, float, str))})
        return out

    def measure_peaks(self, benchmark, lane: BenchLane) -> tuple[dict, dict]:
        """Measure the lane's copy and GEMM peaks now, under pytest-benchmark and NVML: ``(peaks,
        clock and power fields)``. The first measurement of a lane in a session is its roofline
        (``lane.peaks()``) for every later row."""
        with measure.GpuMonitor() as gpu, lane.use():
            peaks = benchmark.pedantic(measure.measured_peaks, args=(lane.granted,), rounds=1)
        self.peaks_cache.setdefault((lane.pset.split, lane.name), peaks)
        return peaks, gpu.summary()

    def time_host(self, benchmark, fn, rounds: int) -> dict:
        """Wall time per call of ``fn`` (GPU drained before and after) under pytest-benchmark."""
        timer = measure.HostTimer(fn)
        with measure.GpuMonitor() as gpu:
            benchmark.pedantic(timer.round, rounds=rounds)
        out = {**timer.stats(), **gpu.summary()}
        benchmark.extra_info.update({k: v for k, v in out.items() if isinstance(v, (int, float, str))})
        return out

    def close(self) -> None:
        if "partitioner" in vars(self):  # opened
            self.partitioner.close()


@pytest.fixture(scope="session")
def bench(request):
    b = Bench(request.config)
    b.open_splits(request.session.items)
    yield b
    b.close()


@pytest.fixture(scope="module")
def recorder(request, bench):
    """The module's rows; written as its results JSON (plus plot and table) when it ends."""
    module = request.module
    rec = results.Recorder(module.BENCHMARK, bench.out_dir, bench_size=bench.size, backend=bench.backend)
    yield rec
    if not rec.rows:
        return
    error = None
    try:
        summary = module.summarize(rec.rows) if hasattr(module, "summarize") else {}
    except Exception as exc:  # keep the rows; report the broken summary after writing them
        summary, error = {"error": f"summarize failed: {type(exc).__name__}: {exc}"}, exc
    path = rec.write(summary)
    WRITTEN.append(path)
    if hasattr(module, "plot"):
        module.plot(rec.rows, path.with_suffix(".png"))
        WRITTEN.append(path.with_suffix(".png"))
    if hasattr(module, "table"):
        TABLES.append((module.BENCHMARK, module.table(rec.rows, summary)))
    if error is not None:
        raise error


@pytest.fixture(scope="module", autouse=True)
def free_gpu_memory_after_module():
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
