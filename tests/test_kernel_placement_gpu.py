"""Kernel-level placement on a GPU: a decode graph whose GEMMs run on a wider lane than the rest
(docs/kernel-placement.md). Green lanes in this process; the tpc backend in fresh processes (its
launch hook, once installed, makes the driver refuse green contexts for the rest of a process).

    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernel_placement_gpu.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bullet_kernels import kernels
from bullet_kernels.config import EngineConfig
from bullet_kernels.engine import GraphKey, ModelRunner, Placement
from bullet_kernels.engine import graph_bank as graph_bank_module
from bullet_kernels.engine.graph_bank import ForkedLane, capture_on_stream
from bullet_kernels.engine.graph_check import LaneExpectation
from bullet_kernels.models.presets import random_model
from bullet_kernels.partition import Partitioner, SMSplit, probe

pytestmark = pytest.mark.gpu

HOME_SPLIT, GEMM_SPLIT = SMSplit(prefill=100, decode=32), SMSplit(prefill=68, decode=64)
HOME, GEMM = Placement(HOME_SPLIT, "decode"), Placement(GEMM_SPLIT, "decode")
REL_TOL = 1e-2  # bf16: the GEMMs sum in another order on another lane's SM count
CFG = EngineConfig(page_size=16, decode_buckets=(8,), prefill_buckets=(512,), prefill_max_seqs=4,
                   layer_groups=2, kv_num_pages=256, max_context=1024, splits=(HOME_SPLIT, GEMM_SPLIT))


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def parts():
    with Partitioner("green") as p:
        for split in (HOME_SPLIT, GEMM_SPLIT):  # up front, before other GPU work
            p.get(split)
        yield p


def lane_sms(parts, placement) -> frozenset[int]:
    lane = parts.get(placement.split).lane(placement.lane)
    return lane.expected_sms or lane.observed_sms


def test_kernels_forked_in_a_capture_keep_the_forked_lanes_sms_on_every_replay(parts):
    """The mechanism: one capture on the home lane's stream, a fork to the GEMM lane's stream and
    a join; each lane's own probe node, inside the graph, runs on its lane's SMs on replays."""
    home, gemm = parts.get(HOME_SPLIT).stream("decode"), parts.get(GEMM_SPLIT).stream("decode")
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    out_home = torch.full((4 * sm_count,), -1, dtype=torch.int32, device="cuda")
    out_gemm = torch.full_like(out_home, -1)
    x = torch.randn(128, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
    for s, out in ((home, out_home), (gemm, out_gemm)):  # resolve the probe in each lane's context first
        probe.launch_probe(s, out, 5)
        s.synchronize()

    def fn():
        probe.launch_probe(home, out_home, 5)
        gemm.wait_stream(home)
        with torch.cuda.stream(gemm):
            probe.launch_probe(gemm, out_gemm, 5)
            y = x @ w.t()
        home.wait_stream(gemm)
        return y.float().sum(-1)

    checks = [ForkedLane(gemm, LaneExpectation(str(GEMM), 64, lane_sms(parts, GEMM) or None, sm_count))]
    home_check = LaneExpectation(str(HOME), 32, lane_sms(parts, HOME) or None, sm_count)
    graph, y = capture_on_stream(fn, home, 32, torch.cuda.graph_pool_handle(), check_lane=home_check,
                                 name="forked", forked=checks)
    other = torch.cuda.Stream()
    for _ in range(3):
        out_home.fill_(-1)
        out_gemm.fill_(-1)
        other.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(other):
            graph.replay()
        other.synchronize()
        seen_home, seen_gemm = probe.sms_written(out_home), probe.sms_written(out_gemm)
        assert len(seen_home) == 32 and len(seen_gemm) == 64, (sorted(seen_home), sorted(seen_gemm))
        if lane_sms(parts, HOME) and lane_sms(parts, GEMM):
            assert seen_home <= lane_sms(parts, HOME) and seen_gemm <= lane_sms(parts, GEMM)
    torch.testing.assert_close(y, (x @ w.t()).float().sum(-1), rtol=2e-2, atol=1.0)


@pytest.fixture(scope="module")
def runner(parts):
    torch.manual_seed(0)
    model = random_model("smollm2-135m", device="cuda", dtype=torch.bfloat16, max_context=1024)
    r = ModelRunner(model, CFG, parts)
    vocab = model.config.vocab_size
    prompts = {f"r{i}": torch.randint(0, vocab, (50 + 37 * i,)).tolist() for i in range(6)}
    r.reserve(list(prompts.items()))
    with torch.no_grad():
        ids, batch = r.plan_prefill(list(prompts.items()))
        r.run(ids.cuda(), batch.to("cuda"))
    tokens = torch.randint(0, vocab, (len(prompts),)).tolist()
    r.reserve([(rid, [t]) for rid, t in zip(prompts, tokens)])
    yield r, r.plan_decode(list(prompts), tokens)  # one decode step of 6 sequences (bucket 8)
    r.close()


def test_decode_graph_with_gemms_on_a_wider_lane_matches_the_plain_graph_and_checks_both_lanes(runner, monkeypatch):
    runner, step = runner
    checked = []
    real = graph_bank_module.check_graph_lanes

    def spy(name, seen):
        checked.append((name, [(lane.where, len(observed)) for observed, lane in seen]))
        return real(name, seen)

    monkeypatch.setattr(graph_bank_module, "check_graph_lanes", spy)
    runner.capture(HOME, phases=("decode",))
    runner.capture(HOME, phases=("decode",), gemm_lane=GEMM)
    placed_key = GraphKey("decode", 8, HOME_SPLIT, "decode", gemm_lane=GEMM)
    assert placed_key in runner.graphs.bank and GraphKey("decode", 8, HOME_SPLIT, "decode") in runner.graphs.bank
    assert checked[-1] == (str(placed_key), [(str(HOME), 32), (f"{GEMM} (GEMM lane)", 64)])
    assert checked[0][1] == [(str(HOME), 32)]  # the plain graph: one lane, one probe, as before

    other = torch.cuda.Stream()
    out = runner.forward(*step, HOME, stream=other)
    other.synchronize()  # the logits buffer is written on ``other``: read it after
    plain = out.clone()
    assert plain.shape[0] == 6 and not torch.equal(plain[0], plain[1])  # real rows, not padding
    for _ in range(2):  # replays after the probe nodes were disabled
        out = runner.forward(*step, HOME, stream=other, gemm_lane=GEMM)
        other.synchronize()
        placed = out.clone()
        assert rel_err(placed, plain) < REL_TOL
        assert (placed.argmax(-1) == plain.argmax(-1)).float().mean() >= 0.8
    assert runner.stats["eager_steps"] == 0


def test_gemms_on_the_whole_gpu_from_a_green_home_lane(runner):
    """The whole-GPU GEMM lane: a capture across a green-context stream and an ordinary stream.
    If the driver refuses that, this is where it shows (docs/kernel-placement.md)."""
    runner, step = runner
    runner.capture(HOME, phases=("decode",))
    runner.capture(HOME, phases=("decode",), gemm_lane=Placement.WHOLE_GPU)
    plain = runner.forward(*step, HOME).clone()  # launched and cloned on the current stream
    placed = runner.forward(*step, HOME, gemm_lane=Placement.WHOLE_GPU).clone()
    torch.cuda.synchronize()
    assert not torch.equal(plain[0], plain[1]) and rel_err(placed, plain) < REL_TOL


def test_a_gemm_lane_of_a_split_not_opened_is_refused_before_gpu_work(runner):
    runner, _ = runner
    from bullet_kernels.errors import CaptureError

    with pytest.raises(CaptureError, match="prefill52-decode80 is not open"):
        runner.capture(HOME, phases=("decode",), gemm_lane=Placement(SMSplit(prefill=52, decode=80), "decode"))


def test_kernels_linear_outside_a_placed_capture_is_not_forked():
    x = torch.randn(8, 64, device="cuda")
    w = torch.randn(32, 64, device="cuda")
    torch.testing.assert_close(kernels.linear(x, w), x @ w.t())


TPC_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from bullet_kernels import kernels
    from bullet_kernels.engine import GraphKey, Placement
    from bullet_kernels.engine.graph_bank import GraphBank
    from bullet_kernels.errors import UnsupportedError
    from bullet_kernels.partition import Partitioner, SMSplit

    home, gemm = SMSplit(prefill=100, decode=32), SMSplit(prefill=68, decode=64)
    try:
        parts = Partitioner("tpc")
        parts.get(home), parts.get(gemm)
    except UnsupportedError as exc:
        print("UNAVAILABLE", exc)
        sys.exit(0)
    print("MECHANISM", parts.backend.mechanism)
    bank = GraphBank(parts)
    key = GraphKey("decode", 8, home, "decode", gemm_lane=Placement(gemm, "decode"))
    x = torch.randn(128, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
    try:
        captured = bank.capture(key, lambda: kernels.linear(x, w))
    except UnsupportedError as exc:
        print("REFUSED", exc)
        sys.exit(0)
    out = bank.replay(key)
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), (x @ w.t()).float(), rtol=2e-2, atol=0.5)
    print("PLACED", key)
""")


def _tpc(mechanism: str) -> str:
    env = {**os.environ, "BULLET_TPC_MECHANISM": mechanism}
    done = subprocess.run([sys.executable, "-c", TPC_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[1], timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    print(done.stdout[-2000:])
    if "UNAVAILABLE" in done.stdout:
        pytest.skip(f"tpc {mechanism} lanes unavailable here: {done.stdout.strip()[-500:]}")
    return done.stdout


def test_tpc_hook_lanes_refuse_kernel_placement_in_a_fresh_process():
    out = _tpc("hook")
    assert "REFUSED" in out and "launch-hook" in out, out


def test_tpc_record_lanes_place_gemms_in_a_fresh_process():
    out = _tpc("record")
    assert "PLACED" in out, out
