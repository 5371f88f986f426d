"""Co-location of prefill and decode (``bullet bench`` under pytest-benchmark).

Mixes A and B of :mod:`bullet_kernels.colocation` (full 32-layer llama-3.1-8b shapes, random
bf16 weights), every mode in one run: sequential, chunked prefill per chunk size, each static
split, each kernel-placement mode ``static-<split>+gemm@<gemm-split>`` (the decode steps' GEMMs
on a wider lane; docs/kernel-placement.md), and the orchestrator planning from the shipped
profile ``graphs/<gpu>/llama-3.1-8b.json``. One test per (mix, mode); the sequential mode of a
mix runs first (its outputs are the reference every other mode must reproduce, checked in each
row), and a plain static mode runs before its kernel-placement modes (their decode logits must
equal its logits).

    python3 -m pytest bench/test_colocation.py -m gpu
    python3 -m pytest bench/test_colocation.py -m gpu -k "prefill100-decode32"   # one split, plain and placed

Writes bench/results/colocation-<gpu>-<yyyymmdd>.json and .png.
"""

from __future__ import annotations

import pytest
import torch

from bullet_kernels import colocation, measure
from bullet_kernels.orchestrate import Estimator, MissingProfile, Profile, find_profile
from bullet_kernels.results import gpu_slug

BENCHMARK = "colocation"
PLAN = colocation.BenchPlan()
GRID = {size: {"mix": tuple(colocation.MIXES), "mode": tuple(PLAN.modes())} for size in ("quick", "full")}
MAX_LOGIT_DIFF = 0.5  # bf16 logits; lanes of other sizes sum in other orders, a wrong result is off by far more


def splits_of(params: dict) -> list:
    return list(PLAN.all_splits)  # opened before any GPU work (bench/conftest.py), GEMM lanes' splits too


@pytest.fixture(scope="module")
def mixes(bench, recorder):
    try:
        path = find_profile(gpu_slug(torch.cuda.get_device_name()), PLAN.preset)
    except MissingProfile as exc:
        pytest.skip(str(exc))
    estimator = Estimator(Profile.load(path))
    plan = colocation.BenchPlan(backend=bench.backend, reps=bench.rounds + 1)
    recorder.extra.update(colocation.run_extra(plan, estimator, simulated=False))
    mb = colocation.MixBench(plan, bench.partitioner, estimator)
    yield mb
    mb.close()


@pytest.mark.gpu
def test_mode(benchmark, recorder, mixes, mix, mode):
    if mixes.plan.gemm_lane_of(mode) is not None and mixes.gemm_refusal(mode):
        pytest.skip(mixes.gemm_refusal(mode))
    run = mixes.mode(mix, mode)
    run.once()  # captures this mode's graphs
    run.reset()
    with measure.GpuMonitor() as gpu:
        benchmark.pedantic(run.once, rounds=mixes.plan.reps)
    row = recorder.add(run.row(gpu.summary()))
    benchmark.extra_info.update({k: row[k] for k in ("median_ms", "splits_used") if k in row})
    assert row["prompt_argmax_agrees"] and row["prompt_logits_max_abs_diff"] < MAX_LOGIT_DIFF, row
    if mixes.plan.gemm_lane_of(mode) is not None:  # same kernels on other SMs: the plain mode's decode logits
        assert row["decode_reference_mode"] is not None, f"run {mixes.plan.plain_static(mode)} first: {row}"
        assert row["decode_logits_max_abs_diff"] < MAX_LOGIT_DIFF, row


def summarize(rows: list[dict]) -> dict:
    return colocation.summarize(rows)


def plot(rows: list[dict], path) -> None:
    colocation.plot(rows, path, "llama-3.1-8b: prefill beside decode")


def table(rows: list[dict], summary: dict) -> str:
    return colocation.table(rows, summary)
