"""bullet_sglang on the GPU: SGLang 0.5.15 started through our launcher answers /generate with
the same tokens as unmodified SGLang (greedy, and sampled with a seed per request), with --enable-bullet (pdmux's loop, --bullet-overlap off,
and our overlapped one, the default) and without, while prefills run beside decodes on a split (the log must show a stream group of a split chosen by our policy).

Needs SGLang 0.5.15 importable by the servers: on the offline GPU machine, after
`.carry/sglang/install.sh` of each wheel part, `BULLET_SGLANG_PYTHONPATH=/tmp/site` (given to the
server processes only, so SGLang's pinned packages never shadow the test's), and the llama-3.1-8b
latency profile of this GPU
(shipped for the H200). Each server start takes minutes on a fresh machine (FlashInfer JIT, graph
capture; later starts reuse the JIT cache): run this file alone in a device call.

Both servers run with the settings --enable-bullet needs (whole-prompt prefill, no overlap
thread), prefill without graphs (bullet prefills eagerly, in layer groups), decode graphs up to
batch 16, deterministic inference and the same random weights (`--load-format dummy`, fixed
seed), so their outputs must match token for token: greedy ones, and sampled ones, since SGLang's
seeded sampling (``sampling_seed``) draws from the logits, the seed and the position only. Every
other request samples (temperature, top-p, top-k), so the decode batches carry sampling
parameters whose corruption greedy decoding would not show (the overlapped loop makes and frees
them while steps are in flight). Requests are sent from threads, one every STAGGER_S, so new
prompts arrive while earlier ones decode.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SGLANG_PATH = os.environ.get("BULLET_SGLANG_PYTHONPATH", "")  # where sglang imports, e.g. /tmp/site
LOG_DIR = os.environ.get("BULLET_SGLANG_LOG_DIR", "")  # keep the servers' logs here (the GPU session's $OUT)


def server_env() -> dict:
    path = [str(REPO / "python"), str(REPO), SGLANG_PATH, os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def sglang_importable() -> bool:
    if importlib.util.find_spec("sglang") is not None:
        return True
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('sglang') is None)"
    return bool(SGLANG_PATH) and subprocess.run([sys.executable, "-c", probe], env=server_env()).returncode == 0


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not sglang_importable(), reason="SGLang is not importable (set BULLET_SGLANG_PYTHONPATH)"),
]

PORT = 30123
PROMPTS = [[1 + (7 * i + j) % 4000 for j in range(200 + 97 * i)] for i in range(12)]
NEW_TOKENS = 64
STAGGER_S = 0.3
START_S = 480
COMMON = ["--load-format", "dummy", "--random-seed", "0", "--enable-deterministic-inference",
          "--attention-backend", "flashinfer", "--sampling-backend", "pytorch", "--disable-radix-cache",
          "--chunked-prefill-size", "-1", "--disable-overlap-schedule", "--disable-prefill-cuda-graph",
          "--cuda-graph-max-bs", "16", "--mem-fraction-static", "0.7"]
SPLIT_CHOSEN = re.compile(r"bullet_sglang: stream group (\d+), \(prefill, decode\) SMs \((\d+), (\d+)\)")


def sampling(i: int) -> dict:
    """Greedy for even prompts, seeded sampling for odd ones."""
    if i % 2 == 0:
        return {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    return {"max_new_tokens": NEW_TOKENS, "temperature": 0.8, "top_p": 0.9, "top_k": 50,
            "sampling_seed": 1000 + i, "ignore_eos": True}


def generate(url: str, i: int) -> list[int]:
    body = json.dumps({"input_ids": PROMPTS[i], "sampling_params": sampling(i)}).encode()
    req = urllib.request.Request(f"{url}/generate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["output_ids"]


def generate_all(url: str) -> list[list[int]]:
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = []
        for i in range(len(PROMPTS)):
            futures.append(pool.submit(generate, url, i))
            time.sleep(STAGGER_S)
        return [f.result() for f in futures]


def stop(proc: subprocess.Popen) -> None:
    """Stop the server's whole process group and wait until none of it is left (its scheduler
    process holds most of the GPU's memory until it exits)."""
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait_s
        while time.time() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(1)


def set_policy_target(url: str, **targets) -> list:
    body = json.dumps({"server_args": targets}).encode()
    req = urllib.request.Request(f"{url}/set_internal_state", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def serve_and_generate(model_dir, extra: list[str], log_path: Path, then=None, env_extra=None) -> list[list[int]]:
    """The outputs of a server started with ``extra`` (and ``env_extra`` in its environment);
    ``then(url)`` runs before it stops."""
    cmd = [sys.executable, "-m", "bullet_sglang.launch_server", "--model-path", str(model_dir),
           "--port", str(PORT), *COMMON, *extra]
    env = {**server_env(), **(env_extra or {})}
    url = f"http://127.0.0.1:{PORT}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            deadline = time.time() + START_S
            while True:
                assert proc.poll() is None, f"the server exited with {proc.returncode}: see {log_path}"
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=2)
                    break
                except OSError:
                    assert time.time() < deadline, f"no answer from {url}/health after {START_S} s: see {log_path}"
                    time.sleep(2)
            outputs = generate_all(url)
            if then is not None:
                then(url)
            return outputs
        finally:
            stop(proc)


def test_enable_bullet_gives_unmodified_sglangs_tokens(tmp_path):
    from bullet_kernels.models.presets import write_model_dir

    model = write_model_dir("llama-3.1-8b", tmp_path / "model")
    logs = Path(LOG_DIR) if LOG_DIR else tmp_path
    logs.mkdir(parents=True, exist_ok=True)
    # bullet first: a failure of the adapter shows before minutes go to the baseline's start
    answers = []

    def change_the_policy(url):  # a benchmark sets each target on one running server
        answers.append(set_policy_target(url, bullet_tpot_slo_ms=10))
        answers.append(set_policy_target(url, bullet_tpot_slo_ms=-1))

    bullet = serve_and_generate(model, ["--enable-bullet", "--bullet-tpot-slo-ms", "15", "--bullet-overlap", "off"],
                                logs / "adapter-bullet.log", then=change_the_policy)
    assert answers == [[True], [False]]
    # the overlapped loop (the default): requests finish while their next step is in flight
    overlapped = serve_and_generate(model, ["--enable-bullet", "--bullet-tpot-slo-ms", "15"],
                                    logs / "adapter-bullet-overlap.log")
    plain = serve_and_generate(model, [], logs / "adapter-sglang.log")
    assert all(len(o) == NEW_TOKENS for o in plain)
    for name in ("adapter-bullet.log", "adapter-bullet-overlap.log"):
        splits = [m.groups() for m in SPLIT_CHOSEN.finditer((logs / name).read_text())]
        assert any(int(p) and int(d) for _, p, d in splits), f"{name}: no split was chosen (groups seen: {splits})"
    overlap_log = (logs / "adapter-bullet-overlap.log").read_text()
    assert "decode steps overlapped, prefills issued in the CPU's slack" in overlap_log
    counts = [tuple(map(int, m)) for m in re.findall(r"decode steps overlapped (\d+) of (\d+)", overlap_log)]
    # no grammar, no penalties: every decode step overlapped, beside prefills too
    assert counts and counts[-1][0] == counts[-1][1] > 0, f"not every decode step was overlapped ({counts})"
    for name, outputs in (("--bullet-overlap off", bullet), ("--enable-bullet (overlapped)", overlapped)):
        mismatched = [(i, "greedy" if i % 2 == 0 else "sampled") for i, (a, b) in enumerate(zip(plain, outputs))
                      if a != b]
        assert not mismatched, f"{name}: outputs differ from unmodified SGLang's for prompts {mismatched}"


def test_the_overlapped_loop_survives_retraction(tmp_path):
    """SGLang's test switch retracts running requests every third forward
    (``SGLANG_TEST_RETRACT``): with the overlapped loop the retracted requests' next step is
    already in flight when they are retracted, so the result processor must skip them and they
    must be prefilled again and finish. Every request must come back with all its tokens. (Not
    compared with unmodified SGLang's: a request prefilled again over its own output need not
    round as its decode steps did.)"""
    from bullet_kernels.models.presets import write_model_dir

    model = write_model_dir("llama-3.1-8b", tmp_path / "model")
    logs = Path(LOG_DIR) if LOG_DIR else tmp_path
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / "adapter-bullet-overlap-retract.log"
    outputs = serve_and_generate(model, ["--enable-bullet", "--bullet-tpot-slo-ms", "15"], log,
                                 env_extra={"SGLANG_TEST_RETRACT": "1"})
    assert [len(o) for o in outputs] == [NEW_TOKENS] * len(PROMPTS)
    text = log.read_text()
    retracted = [int(n) for n in re.findall(r"Testing retraction\. #retracted_reqs: (\d+)", text)]
    assert sum(retracted) > 0, "SGLANG_TEST_RETRACT retracted nothing: the test did not test retraction"
    counts = [tuple(map(int, m)) for m in re.findall(r"decode steps overlapped (\d+) of (\d+)", text)]
    assert counts and counts[-1][0] > 0, f"no decode step was overlapped ({counts})"
