"""The benchmark suite (bench/) and bullet_kernels.sweep on CPU: the suite collects, every
benchmark is GPU-marked, it uses only the public API, its options are checked, and the sweep's
pure parts (plan, costs, summary, plot) are right."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bullet_kernels import sweep

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
BENCH_FILES = ("test_decode_partitions.py", "test_decode_breakdown.py", "test_compile_backend.py",
               "test_capture_bank.py", "test_sm_sweep.py", "test_sglang_compare.py", "test_roofline.py")


def pytest_in_child(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_every_benchmark_is_collected_and_gpu_marked():
    gpu = pytest_in_child("bench/", "--collect-only", "-q", "-m", "gpu")
    assert gpu.returncode == 0, gpu.stdout[-3000:] + gpu.stderr[-3000:]
    ids = [line for line in gpu.stdout.splitlines() if "::" in line]
    for name in BENCH_FILES:
        assert any(i.startswith(f"bench/{name}::") for i in ids), f"nothing collected from bench/{name}"
    rest = pytest_in_child("bench/", "--collect-only", "-q", "-m", "not gpu")
    assert rest.returncode == 5, "a benchmark without the gpu mark: " + rest.stdout[-2000:]


@pytest.mark.parametrize("option, message", [
    ("--bench-sms=16,x", "is not a positive SM count"),
    ("--bench-size=huge", "invalid choice"),
])
def test_bad_suite_options_are_usage_errors(option, message):
    out = pytest_in_child("bench/", "--collect-only", "-q", option)
    assert out.returncode == 4 and message in out.stderr, out.stderr[-2000:]


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def private_uses(path: Path) -> list[str]:
    """Imports of underscore names, attribute access to them, sys.path edits, monkeypatching."""
    def private(name: str) -> bool:  # _x, not __x__ (dunders such as __future__ are public)
        return name.startswith("_") and not name.endswith("__")

    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found += [f"line {node.lineno}: import of {m}" for m in modules if any(map(private, m.split(".")))]
            if isinstance(node, ast.ImportFrom):
                found += [f"line {node.lineno}: from {node.module} import {a.name}" for a in node.names if private(a.name)]
        elif isinstance(node, ast.Attribute) and private(node.attr):
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
            found.append(f"line {node.lineno}: sys.path")
        elif isinstance(node, ast.Name) and node.id == "monkeypatch":
            found.append(f"line {node.lineno}: monkeypatch")
    return found


@pytest.mark.parametrize("path", python_files(BENCH), ids=lambda p: str(p.relative_to(ROOT)))
def test_bench_uses_only_the_public_api(path):
    assert private_uses(path) == []


def test_products_never_import_bench():
    pattern = re.compile(r"^\s*(from|import)\s+bench\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in python_files(ROOT / "bullet_kernels") if pattern.search(p.read_text())]
    assert offenders == []


def bench_module(name: str):
    """A bench/ module loaded from its file (bench/ is not on this process's import path)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_split_a_grid_names_parses():
    """conftest opens these before any GPU work; a typo would fail only on the GPU machine."""
    from bullet_kernels import SMSplit

    compile_bench, capture_bench = bench_module("test_compile_backend"), bench_module("test_capture_bank")
    assert compile_bench.splits_of({"mode": "colocated-prefill=96,decode=36"}) == [SMSplit(prefill=96, decode=36)]
    assert compile_bench.splits_of({"mode": "inductor-sequential"}) == []
    assert capture_bench.splits_of({"placement": "prefill=100,decode=32:decode"}) == [SMSplit(prefill=100, decode=32)]
    assert capture_bench.splits_of({"placement": "whole-gpu"}) == []
    for module, name in ((compile_bench, "mode"), (capture_bench, "placement")):
        for size in ("quick", "full"):
            for value in module.GRID[size][name]:
                for split in module.splits_of({name: value}):
                    assert split.total <= 132, f"{value} does not fit a 132-SM GPU"


def test_sglang_output_is_parsed_from_a_real_log():
    """The kept H100 log of bench_one_batch: its first run is the 2048-token prefill at batch 1."""
    module = bench_module("test_sglang_compare")
    runs = (BENCH / "results" / "sglang-bench-one-batch.log").read_text().split("\n$ ")
    first = module.parse_latencies(runs[0])
    assert first["prefill_ms"] == pytest.approx(47.17) and first["decode_median_ms"] == pytest.approx(7.85, abs=0.05)
    with pytest.raises(ValueError, match="Prefill"):
        module.parse_latencies("Traceback (most recent call last): out of memory")


# ------------------------------------------------------------------------------ sweep, pure


def test_sweep_plan_from_cli_options_and_its_workloads():
    args = argparse.Namespace(preset="llama-3.1-8b", prompt=512, decode_batch=[128, 32], context=1000, groups=2,
                              reps=3, backend="green", quick=True, out="x")
    plan = sweep.SweepPlan.from_args(args)
    assert plan.decode_batch == (32, 128)
    assert [w.name for w in plan.workloads()] == ["prefill", "decode-b32", "decode-b128"]
    assert plan.rounds(plan.workloads()[0]) == 3 and plan.rounds(plan.workloads()[1]) == 12
    # 512 / 16 prompt pages + (32 + 128) sequences x ceil(1001 / 16) = 63 pages, + 2 spare
    assert plan.kv_pages() == 32 + 160 * 63 + 2
    assert plan.max_context == 1001 + 64


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": 0}, "prompt must be a positive int"),
    ({"decode_batch": (32, 32)}, "lists a batch twice"),
    ({"decode_batch": ()}, "decode_batch must be positive"),
    ({"preset": "gpt-5"}, "unknown preset"),
    ({"backend": "mps"}, "unknown partition backend"),
    ({"reps": True}, "reps must be a positive int"),
])
def test_sweep_plan_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sweep.SweepPlan(**kwargs)


def test_sm_counts_end_with_the_whole_gpu():
    assert sweep.sm_counts(True, 132) == [16, 32, 48, 64, 96, 132]
    assert sweep.sm_counts(False, 132)[-2:] == [128, 132]
    assert sweep.sm_counts(True, 60) == [16, 32, 48, 60]


def test_model_costs_of_llama_8b():
    from bullet_kernels.models.presets import preset_config

    cfg = preset_config("llama-3.1-8b")
    decode = sweep.model_costs(cfg, sweep.Workload("decode", 32), context=1024)
    # Weights read once: every parameter but the embedding table (8.03e9 in all), bf16.
    embedding = cfg.vocab_size * cfg.hidden_size
    kv = 32 * 1024 * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    assert (decode["bytes"] - kv) / 2 + embedding == pytest.approx(8.03e9, rel=2e-3)
    assert decode["flops"] == pytest.approx(2 * 32 * (decode["bytes"] - kv) / 2 + 4 * 32 * 1024 * 32 * 128 * 32)
    prefill = sweep.model_costs(cfg, sweep.Workload("prefill", 2048), context=0)
    assert prefill["flops"] / 2048 == pytest.approx(2 * 7.0e9, rel=0.05)  # ~2 FLOPs per weight per token


def rows_for(sms: int, prefill_ms: float, b32_ms: float, b128_ms: float) -> list[dict]:
    return [
        {"phase": "prefill", "workload": "prefill", "sms_granted": sms, "median_ms": prefill_ms, "tok_s": 2048 / prefill_ms * 1e3,
         "mfu": 0.5, "tbps": 0.1},
        {"phase": "decode", "workload": "decode-b32", "batch": 32, "sms_granted": sms, "median_ms": b32_ms, "tbps": 1.0},
        {"phase": "decode", "workload": "decode-b128", "batch": 128, "sms_granted": sms, "median_ms": b128_ms, "tbps": 2.0},
    ]


def test_sweep_summary_finds_the_smallest_lane_within_10pct(tmp_path):
    rows = rows_for(16, 300.0, 16.0, 35.0) + rows_for(48, 100.0, 8.7, 14.5) + rows_for(64, 90.0, 8.0, 14.0) \
        + rows_for(132, 50.0, 8.0, 13.0) + [{"phase": "capture", "sms_granted": 16, "graphs": 6}]
    s = sweep.summarize(rows)
    assert s["full_gpu_sms"] == 132 and s["full_gpu_decode-b128_ms"] == 13.0
    assert s["smallest_sms_decode_within_10pct"] == 64  # 48 SMs: b32 8.7 > 1.1 x 8.0
    assert "132 SMs" in sweep.row_text(rows_for(132, 50.0, 8.0, 13.0))
    png = sweep.plot(rows, tmp_path / "sweep.json", "unit test")
    assert png.name == "sweep.png" and png.stat().st_size > 0


def roofline_rows() -> list[dict]:
    """Rows shaped as bench/test_roofline.py writes them (numbers made up for the logic below)."""
    from bench.test_roofline import LAUNCH_FLOOR_MS
    from bullet_kernels import measure

    peaks = {32: {"copy_tbps": 3.0, "gemm_tflops": 200.0}, 132: {"copy_tbps": 3.8, "gemm_tflops": 700.0}}
    rows = [{"kind": "peaks", "sms": n, **p, "sm_clock_mhz": 1980.0, "power_w": 400.0} for n, p in peaks.items()]
    for n, ms in ((32, 2.0), (132, 1.0)):
        base = {"phase": "decode", "rows": 128, "context": 2048, "sms": n}
        rows.append({"kind": "op", **base, "op": "attention", "op_kind": "attention", "median_ms": ms / 2,
                     **measure.roofline_fields(ms / 2, 1.2e9, 1e9, peaks[n]), "launch_bound": False})
        rows.append({"kind": "op", **base, "op": "silu_mul", "op_kind": "elementwise", "median_ms": 0.003,
                     **measure.roofline_fields(0.003, 1e6, 0, peaks[n]), "launch_bound": True})
        rows.append({"kind": "layer", **base, "op": "layer", "median_ms": ms, "sum_op_rooflines_ms": 0.9,
                     "pct_of_op_rooflines": 90 / ms})
    assert all(r["roofline_ms"] < LAUNCH_FLOOR_MS for r in rows if r.get("launch_bound"))
    return rows


def test_roofline_summary_leaves_launch_bound_kernels_out(tmp_path):
    from bench import test_roofline

    rows = roofline_rows()
    s = test_roofline.summarize(rows)
    assert s["copy_tbps@32"] == 3.0 and s["gemm_tflops@132"] == 700.0
    assert s["decode_attention_pct_min@32"] == pytest.approx(100 * 0.4 / 1.0, abs=0.1)  # 1.2 GB at 3 TB/s in 1 ms
    assert "decode_elementwise_pct_min@32" not in s  # the only elementwise kernel is launch-bound
    assert s["decode_layers_at_85pct@132"] == "1 of 1" and s["decode_layers_at_85pct@32"] == "0 of 1"
    assert s["decode_b128_ctx2048@32_over_full"] == 2.0
    text = test_roofline.table(rows, s)
    assert "lane  32 SMs: copy 3.00 TB/s" in text and "silu_mul" in text and "*" in text
    test_roofline.plot(rows, tmp_path / "roofline.png")
    assert (tmp_path / "roofline.png").stat().st_size > 0
