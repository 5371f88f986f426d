"""Our whole-GPU prefill and decode step against real SGLang's ``bench_one_batch``.

Same machine, same shapes, same random ("dummy") weights of the llama-3.1-8b config: one
2048-token prefill, and decode steps at batch 32 and 128 with 1024 tokens of context. Ours are
the engine's graphs replayed on the whole GPU (as in ``bullet sweep``); SGLang runs in a child
process with FlashInfer attention, after our model has left the GPU.

Skips unless SGLang imports (in this interpreter, or under ``--sglang-pythonpath``) and a model
directory is given (``--sglang-model-dir`` or ``BULLET_SGLANG_MODEL_DIR``); one can be written
with ``bullet_kernels.models.presets.write_model_dir("llama-3.1-8b", DIR)``.

    python3 -m pytest bench/test_sglang_compare.py -m gpu --sglang-model-dir DIR [--sglang-pythonpath SITE]

Writes bench/results/sglang-compare-<gpu>-<yyyymmdd>.json and SGLang's output beside it
(sglang-bench-one-batch-<gpu>-<yyyymmdd>.log).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bullet_kernels import measure, results, sweep

BENCHMARK = "sglang-compare"
PLAN = sweep.SweepPlan(prompt=2048, decode_batch=(32, 128), context=1024)
WORKLOADS = {w.name: w for w in PLAN.workloads()}
GRID = {"quick": {"workload": list(WORKLOADS)}, "full": {"workload": list(WORKLOADS)}}
PREFILL = re.compile(r"Prefill\.\s+latency:\s+([\d.]+) s")
DECODE = re.compile(r"Decode\.\s+median latency:\s+([\d.]+) s")


def parse_latencies(text: str) -> dict:
    """Prefill latency and median decode latency (ms) from one ``bench_one_batch`` run's output.

    It prints a warm-up pass first; the last numbers are the measured run.
    """
    prefill, decode = PREFILL.findall(text), DECODE.findall(text)
    if not prefill or not decode:
        raise ValueError("no 'Prefill. latency' / 'Decode.  median latency' lines in SGLang's output")
    return {"prefill_ms": float(prefill[-1]) * 1e3, "decode_median_ms": float(decode[-1]) * 1e3}


class SGLang:
    """Runs ``python -m sglang.bench_one_batch`` in a child process and logs its output."""

    def __init__(self, model_dir: str, env: dict, version: str, log: Path):
        self.model_dir, self.env, self.version, self.log = model_dir, env, version, log

    def run(self, batch: int, input_len: int, output_len: int) -> dict:
        cmd = [
            sys.executable, "-m", "sglang.bench_one_batch", "--model-path", self.model_dir, "--load-format", "dummy",
            "--attention-backend", "flashinfer", "--sampling-backend", "pytorch", "--disable-radix-cache",
            "--mem-fraction-static", "0.8", "--batch-size", str(batch), "--input-len", str(input_len),
            "--output-len", str(output_len),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=600)
        with self.log.open("a") as log:
            log.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"sglang.bench_one_batch exited {proc.returncode}: {tail[0][:300]} (log: {self.log})")
        return parse_latencies(proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def sglang(request, bench) -> SGLang:
    model_dir = request.config.getoption("sglang_model_dir")
    if not model_dir:
        pytest.skip("no SGLang model directory: pass --sglang-model-dir DIR or set BULLET_SGLANG_MODEL_DIR")
    if not (Path(model_dir) / "config.json").is_file():
        pytest.fail(f"--sglang-model-dir {model_dir}: no config.json there; write one with "
                    "bullet_kernels.models.presets.write_model_dir('llama-3.1-8b', DIR)")
    env = dict(os.environ)
    pythonpath = request.config.getoption("sglang_pythonpath")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    probe = subprocess.run([sys.executable, "-c", "import sglang; print(sglang.__version__)"],
                           capture_output=True, text=True, env=env, timeout=300)
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"sglang does not import (PYTHONPATH={pythonpath or 'unset'}): {why}")
    env_facts = results.environment()
    log = results.result_path("sglang-bench-one-batch", env_facts["device"], env_facts["timestamp"], bench.out_dir)
    log = log.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    return SGLang(model_dir, env, probe.stdout.strip(), log)


class Ours:
    """Our measurements, taken first; the model leaves the GPU before SGLang starts."""

    def __init__(self, bench):
        self.bench, self.model_sweep, self.rows = bench, None, {}

    def measure(self, benchmark, workload) -> dict:
        if self.model_sweep is None:
            plan = dataclasses.replace(PLAN, backend=self.bench.backend)
            self.model_sweep = sweep.ModelSweep(plan, self.bench.partitioner)
        run = self.model_sweep.lane(self.bench.full_sms)
        timer = self.model_sweep.timer(workload, run)
        timer.warmup()
        with measure.GpuMonitor() as gpu:
            benchmark.pedantic(timer.round, rounds=PLAN.rounds(workload))
        row = self.model_sweep.row(workload, run, timer.stats(), gpu.summary())
        self.rows[workload.name] = row
        return row

    def leave_gpu(self) -> None:
        if self.model_sweep is not None:
            self.model_sweep.close()
            self.model_sweep = None


@pytest.fixture(scope="module")
def ours(bench, recorder, sglang):
    recorder.extra.update(sglang=sglang.version, sglang_attention="flashinfer", model="llama-3.1-8b dummy weights",
                          prompt_tokens=PLAN.prompt, decode_context=PLAN.context)
    o = Ours(bench)
    yield o
    o.leave_gpu()


@pytest.mark.gpu
def test_ours(benchmark, ours, workload):
    row = ours.measure(benchmark, WORKLOADS[workload])
    benchmark.extra_info.update(median_ms=row["median_ms"], sms=row["sms_granted"])


@pytest.mark.gpu
def test_sglang(recorder, ours, sglang, workload):
    ours.leave_gpu()
    mine = ours.rows.get(workload)
    if mine is None:
        pytest.skip(f"test_ours[{workload}] did not run in this session; nothing to compare with")
    w = WORKLOADS[workload]
    row = {"measure": workload, "ours_ms": mine["median_ms"], "ours_p10_ms": mine["p10_ms"],
           "ours_p90_ms": mine["p90_ms"], "ours_sm_clock_mhz": mine["sm_clock_mhz"], "ours_power_w": mine["power_w"]}
    try:
        if w.phase == "prefill":
            row["sglang_ms"] = sglang.run(1, w.size, 4)["prefill_ms"]
        else:
            row["sglang_ms"] = sglang.run(w.size, PLAN.context, 8)["decode_median_ms"]
    except RuntimeError as exc:  # e.g. SGLang's one-shot prefill of batch x context runs out of memory
        recorder.add({**row, "sglang_error": str(exc)})
        pytest.skip(f"SGLang failed on {workload}: {exc}")
    row["ours_over_sglang"] = row["ours_ms"] / row["sglang_ms"]
    recorder.add(row)


def summarize(rows: list[dict]) -> dict:
    return {r["measure"]: r.get("ours_over_sglang") for r in rows}


def table(rows: list[dict], summary: dict) -> str:
    return "\n".join(
        f"  {r['measure']:12s} ours {r['ours_ms']:8.2f} ms  "
        + (f"sglang {r['sglang_ms']:8.2f} ms  ratio {r['ours_over_sglang']:.2f}" if "sglang_ms" in r
           else f"sglang failed: {r['sglang_error']}")
        for r in rows)
