"""bullet_kernels.measure on CPU: statistics, roofline fields, NVML decoding and its absence,
and the persistent copy kernel under Triton's interpreter (a child process)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from bullet_kernels import measure


@pytest.mark.parametrize("q", [0, 10, 25, 50, 90, 100])
def test_percentile_matches_numpy_linear_interpolation(q):
    values = list(np.random.default_rng(q).normal(5, 2, size=37))
    assert measure.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_one_value_and_of_an_even_count():
    assert measure.percentile([3.0], 90) == 3.0
    assert measure.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5


@pytest.mark.parametrize("values, q, message", [([], 50, "empty"), ([1.0], 101, "0..100"), ([1.0], -1, "0..100")])
def test_percentile_refuses_bad_input(values, q, message):
    with pytest.raises(ValueError, match=message):
        measure.percentile(values, q)


def test_time_stats_keeps_samples_and_percentiles():
    times = [float(t) for t in range(1, 11)]  # 1..10 ms
    s = measure.time_stats(times)
    assert s["median_ms"] == 5.5 and s["min_ms"] == 1.0 and s["mean_ms"] == 5.5 and s["reps"] == 10
    assert s["p10_ms"] == pytest.approx(1.9) and s["p90_ms"] == pytest.approx(9.1)
    assert s["samples_ms"] == times


class CountingTimer(measure.Timer):
    """A Timer whose n-th call takes n ms: exercises the round and warm-up bookkeeping."""

    def round(self):
        for _ in range(self.calls_per_round):
            self.times_ms.append(self.fn() / self.units)


def test_timer_warmup_is_forgotten_and_rounds_accumulate():
    timer = CountingTimer(itertools.count(1).__next__, calls_per_round=3, units=2)
    timer.warmup(1)
    assert timer.times_ms == []
    stats = timer.run(2)
    assert stats["reps"] == 6
    assert timer.times_ms == [2.0, 2.5, 3.0, 3.5, 4.0, 4.5]  # calls 4..9, per unit (2 units a call)


@pytest.mark.parametrize("kwargs", [{"calls_per_round": 0}, {"units": 0}])
def test_timer_refuses_nonpositive_counts(kwargs):
    with pytest.raises(ValueError, match=">= 1"):
        measure.EventTimer(lambda: None, **kwargs)


def test_roofline_fields_memory_and_compute_bound():
    peaks = {"copy_tbps": 2.0, "gemm_tflops": 400.0}
    mem = measure.roofline_fields(median_ms=1.0, nbytes=1.5e9, flops=1e11, peaks=peaks)
    # 1.5 GB at 2 TB/s = 0.75 ms; 0.1 TFLOP at 400 TFLOP/s = 0.25 ms
    assert mem["bound"] == "memory" and mem["roofline_ms"] == pytest.approx(0.75)
    assert mem["pct_of_roofline"] == pytest.approx(75.0) and mem["tbps"] == pytest.approx(1.5)
    comp = measure.roofline_fields(median_ms=2.0, nbytes=1e8, flops=4e14 * 1e-3, peaks=peaks)
    assert comp["bound"] == "compute" and comp["roofline_ms"] == pytest.approx(1.0)
    assert comp["tflops"] == pytest.approx(200.0) and comp["lane_gemm_tflops"] == 400.0
    assert measure.roofline_ms(1.5e9, 1e11, peaks) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="positive"):
        measure.roofline_fields(0.0, 1, 1, peaks)


def test_clock_event_reasons_decode_bits():
    assert measure.clock_event_reasons(0) == []
    assert measure.clock_event_reasons(0x4 | 0x1) == ["gpu_idle", "sw_power_cap"]
    assert measure.clock_event_reasons(0x40 | 0x800) == ["hw_thermal_slowdown", "0x800"]
    with pytest.raises(ValueError, match="non-negative"):
        measure.clock_event_reasons(-1)


def test_summarize_samples_medians_shares_and_energy():
    samples = [
        {"sm_clock_mhz": 1980, "power_w": 500.0, "reasons": 0x0},
        {"sm_clock_mhz": 1600, "power_w": 700.0, "reasons": 0x4},
        {"sm_clock_mhz": 1620, "power_w": 690.0, "reasons": 0x4},
        {"sm_clock_mhz": 1700, "power_w": 650.0, "reasons": 0x1},
    ]
    s = measure.summarize_samples(samples, energy_j=13.0, seconds=0.02)
    assert s["sm_clock_mhz"] == 1660 and s["sm_clock_mhz_min"] == 1600 and s["sm_clock_mhz_max"] == 1980
    assert s["power_w"] == 670.0 and s["power_w_max"] == 700.0
    assert s["throttle_reasons"] == {"gpu_idle": 0.25, "sw_power_cap": 0.5}
    assert s["energy_power_w"] == pytest.approx(650.0) and s["nvml_samples"] == 4


def test_summarize_no_samples_says_unavailable():
    s = measure.summarize_samples([])
    assert s["sm_clock_mhz"] == s["power_w"] == s["throttle_reasons"] == measure.UNAVAILABLE


@pytest.fixture
def without_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    measure.nvml_device.cache_clear()
    yield
    measure.nvml_device.cache_clear()


def test_gpu_monitor_without_nvml_reports_unavailable(without_nvml):
    with measure.GpuMonitor(interval_s=0.001) as gpu:
        pass
    s = gpu.summary()
    assert s["sm_clock_mhz"] == s["power_w"] == s["throttle_reasons"] == "unavailable"
    assert "nvidia-ml-py" in s["nvml"]
    limits = measure.gpu_limits()
    assert limits["power_limit_w"] == limits["sm_clock_max_mhz"] == "unavailable"


def test_gpu_monitor_refuses_nonpositive_interval():
    with pytest.raises(ValueError, match="interval_s"):
        measure.GpuMonitor(interval_s=0)


def test_persistent_copy_under_the_interpreter():
    """Fewer programs than blocks and a ragged tail: each program must loop over its blocks."""
    code = (
        "import torch\n"
        "from bullet_kernels import measure\n"
        "src = torch.randn(4096 * 5 + 123)\n"
        "dst = torch.full_like(src, float('nan'))\n"
        "measure.persistent_copy(src, dst, programs=2)\n"
        "assert torch.equal(src, dst), (src - dst).abs().max()\n"
        "try:\n"
        "    measure.persistent_copy(src, dst[:-1], programs=2)\n"
        "except ValueError as exc:\n"
        "    assert 'same numel' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('a size mismatch was accepted')\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
