"""bullet_sglang on the GPU: SGLang 0.5.15 started through our launcher answers /generate with
the same greedy tokens as unmodified SGLang, with and without --enable-bullet.

Needs SGLang 0.5.15 importable (on the offline GPU machine: PYTHONPATH=/tmp/site after
`.carry/sglang/install.sh` of each wheel part) and the llama-3.1-8b latency profile of this GPU
(shipped for the H200). Each server start takes minutes (FlashInfer JIT, graph capture): the
two starts take about 6-9 minutes together.

Both servers run the settings --enable-bullet needs (whole-prompt prefill, no overlap thread),
deterministic inference and the same random weights (`--load-format dummy`, fixed seed), so their
greedy outputs must match token for token.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="SGLang is not installed"),
]

PORT = 30123
PROMPTS = [[1 + (7 * i + j) % 4000 for j in range(200 + 150 * i)] for i in range(6)]
COMMON = ["--load-format", "dummy", "--random-seed", "0", "--enable-deterministic-inference",
          "--attention-backend", "flashinfer", "--sampling-backend", "pytorch", "--disable-radix-cache",
          "--chunked-prefill-size", "-1", "--disable-overlap-schedule", "--mem-fraction-static", "0.7"]


def generate_all(url: str) -> list[list[int]]:
    out = []
    for ids in PROMPTS:
        body = json.dumps({"input_ids": ids, "sampling_params": {"max_new_tokens": 24, "temperature": 0,
                                                                  "ignore_eos": True}}).encode()
        req = urllib.request.Request(f"{url}/generate", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out.append(json.loads(r.read())["output_ids"])
    return out


def serve_and_generate(model_dir, extra: list[str], log) -> list[list[int]]:
    cmd = [sys.executable, "-m", "bullet_sglang.launch_server", "--model-path", str(model_dir),
           "--port", str(PORT), *COMMON, *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{PORT}"
    try:
        deadline = time.time() + 540
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}: see {log.name}"
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, f"no answer from {url}/health after 540 s: see {log.name}"
                time.sleep(2)
        return generate_all(url)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_enable_bullet_gives_unmodified_sglangs_greedy_tokens(tmp_path):
    from bullet_kernels.models.presets import write_model_dir

    model = write_model_dir("llama-3.1-8b", tmp_path / "model")
    with open(tmp_path / "sglang.log", "w") as log:
        plain = serve_and_generate(model, [], log)
    with open(tmp_path / "bullet.log", "w") as log:
        bullet = serve_and_generate(model, ["--enable-bullet", "--bullet-tpot-slo-ms", "15"], log)
    assert all(len(o) == 24 for o in plain)
    assert bullet == plain
