"""SM sweep of the engine (``bullet sweep`` under pytest-benchmark): prefill and decode steps of
the llama-3.1-8b preset (random bf16 weights) captured and replayed on partitions of each size.

One test per (SM count, workload); the graphs of one SM count are captured when its first test
runs and dropped before the next count's. Rows as ``bullet sweep`` writes them (see
``bullet_kernels/sweep.py``): per-replay samples, the lane's measured peaks and roofline, and
the SM clock and power sampled while each step ran.

    python3 -m pytest bench/test_sm_sweep.py -m gpu [--bench-size full]

Writes bench/results/sm-sweep-<gpu>-<yyyymmdd>.json and .png.
"""

from __future__ import annotations

import pytest

from bullet_kernels import measure, sweep

BENCHMARK = "sm-sweep"
PLAN = sweep.SweepPlan()  # bullet sweep's defaults: a 2048-token prompt, decode b32/b128 at 1024
GRID = {
    "quick": {"sms": (*sweep.QUICK_SMS, "all"), "workload": [w.name for w in PLAN.workloads()]},
    "full": {"sms": (*sweep.FULL_SMS, "all"), "workload": [w.name for w in PLAN.workloads()]},
}


@pytest.fixture(scope="module")
def model_sweep(bench, recorder):
    plan = sweep.SweepPlan(backend=bench.backend)
    s = sweep.ModelSweep(plan, bench.partitioner)
    recorder.extra.update(sweep.run_extra(plan), peaks=s.peaks)
    yield s
    for row in s.capture_rows:
        recorder.add(row)
    s.close()


@pytest.mark.gpu
def test_step(benchmark, bench, recorder, model_sweep, sms, workload):
    run = model_sweep.lane(bench.sm_count(sms))
    work = {w.name: w for w in model_sweep.plan.workloads()}[workload]
    timer = model_sweep.timer(work, run)
    timer.warmup()
    with measure.GpuMonitor() as gpu:
        benchmark.pedantic(timer.round, rounds=model_sweep.plan.rounds(work))
    row = recorder.add(model_sweep.row(work, run, timer.stats(), gpu.summary()))
    benchmark.extra_info.update({k: row[k] for k in ("sms_granted", "median_ms", "p10_ms", "p90_ms", "pct_of_roofline")})


def summarize(rows: list[dict]) -> dict:
    return sweep.summarize(rows)


def plot(rows: list[dict], path) -> None:
    sweep.plot(rows, path, "llama-3.1-8b: prefill and decode against SMs")


def table(rows: list[dict], summary: dict) -> str:
    meas = sweep.measured_rows(rows)
    return "\n".join(sweep.row_text([r for r in meas if r["sms_granted"] == n])
                     for n in sorted({r["sms_granted"] for r in meas}))
