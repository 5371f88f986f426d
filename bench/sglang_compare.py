"""Our full-GPU prefill/decode latency against real SGLang 0.5.15 `bench_one_batch` (issue 3).

Run on the GPU machine in the same call as `bullet sweep` (same machine, same shapes: one
2048-token prefill; decode at batch 32 and 128 with 1024 tokens of context), after the offline
SGLang wheel set is installed into /tmp/site (shared/tools/offline-sglang). SGLang runs with
random (dummy) weights of the same Llama-3.1-8B config and FlashInfer attention.

    python bench/sglang_compare.py --model-dir .carry/llama-3.1-8b-dummy --sweep-json bench/results/sm-sweep-h100-<date>.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bullet_kernels import results  # noqa: E402

PREFILL = re.compile(r"Prefill\.\s+latency:\s+([\d.]+) s")
DECODE = re.compile(r"Decode\.\s+median latency:\s+([\d.]+) s")


def parse_latencies(text: str) -> dict:
    # bench_one_batch prints a warm-up pass first; the last numbers are the measured run.
    prefill = [float(x) for x in PREFILL.findall(text)]
    decode = [float(x) for x in DECODE.findall(text)]
    if not prefill or not decode:
        raise RuntimeError("could not find the Prefill/Decode latency lines in SGLang's output")
    return {"prefill_ms": prefill[-1] * 1e3, "decode_median_ms": decode[-1] * 1e3}


def run_sglang(model_dir: str, batch: int, input_len: int, output_len: int, site: str, log) -> dict:
    cmd = [
        sys.executable, "-m", "sglang.bench_one_batch", "--model-path", model_dir, "--load-format", "dummy",
        "--attention-backend", "flashinfer", "--sampling-backend", "pytorch", "--disable-radix-cache",
        "--mem-fraction-static", "0.8", "--batch-size", str(batch), "--input-len", str(input_len),
        "--output-len", str(output_len),
    ]
    env = {**os.environ, "PYTHONPATH": site}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    log.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"sglang.bench_one_batch failed ({proc.returncode}); see the log. Tail:\n{proc.stderr[-2000:]}")
    return parse_latencies(proc.stdout + proc.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--sweep-json", required=True, help="our `bullet sweep` result from this run")
    p.add_argument("--site", default="/tmp/site")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    ours = json.loads(Path(args.sweep_json).read_text())
    full = ours["rows"][-1]
    prompt, ctx = ours["prompt_tokens"], ours["decode_context"]
    rows = []
    with open(Path(args.out) / "sglang-bench-one-batch.log", "w") as log:
        sg = run_sglang(args.model_dir, 1, prompt, 4, args.site, log)
        rows.append({"measure": f"prefill {prompt} tokens", "ours_ms": full["prefill_ms"], "sglang_ms": sg["prefill_ms"]})
        for b in (32, 128):
            if f"decode_b{b}_ms" not in full:
                continue
            row = {"measure": f"decode step batch {b} ctx ~{ctx}", "ours_ms": full[f"decode_b{b}_ms"]}
            try:
                row["sglang_ms"] = run_sglang(args.model_dir, b, ctx, 8, args.site, log)["decode_median_ms"]
            except RuntimeError as exc:  # e.g. SGLang's one-shot prefill of b x ctx tokens runs out of memory
                row["sglang_error"] = str(exc).splitlines()[-1][:300]
            rows.append(row)
    for r in rows:
        if "sglang_ms" in r:
            r["ours_over_sglang"] = r["ours_ms"] / r["sglang_ms"]
    summary = {r["measure"]: r.get("ours_over_sglang") for r in rows}
    path = results.write("sglang-compare", rows, summary, args.out, sglang="0.5.15", sglang_attention="flashinfer",
                         ours_from=Path(args.sweep_json).name, model="llama-3.1-8b dummy weights")
    print(f"results: {path}")
    for r in rows:
        if "sglang_ms" in r:
            print(f"  {r['measure']:32s} ours {r['ours_ms']:8.2f} ms  sglang {r['sglang_ms']:8.2f} ms  ratio {r['ours_over_sglang']:.2f}")
        else:
            print(f"  {r['measure']:32s} ours {r['ours_ms']:8.2f} ms  sglang failed: {r['sglang_error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
