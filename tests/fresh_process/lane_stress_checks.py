"""Lane stress (issue #10): many splits opened late, in a seeded random order, with eager Triton
kernels, Inductor-compiled functions (with and without cudagraph trees), cuBLAS GEMMs and our
graph captures in between; after every operation the lane it ran on is probed twice (our
driver-loaded probe and a Triton-loaded one, since Triton and Inductor load their modules with
the primary context current), and every graph we capture is verified by the graph bank's probe.

One backend per process (``BULLET_STRESS_BACKEND`` = green or tpc): green contexts cannot be
created once a tpc launch hook is installed. tests/test_lane_stress_gpu.py runs this file; it
is not collected by a plain ``pytest``. ``BULLET_STRESS_STEPS`` / ``BULLET_STRESS_SEED`` tune it.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from bullet_kernels import Partitioner, SMSplit
from bullet_kernels.engine.graph_bank import capture_on_stream
from bullet_kernels.engine.graph_check import LaneExpectation
from bullet_kernels.kernels.norm import rms_norm
from bullet_kernels.partition import probe
from bullet_kernels.partition.probe_triton import triton_observed_sms
from bullet_kernels.partition.base import format_ranges

pytestmark = pytest.mark.gpu
SPLITS = ["prefill=96,decode=36", "prefill=104,decode=28", "prefill=112,decode=20", "prefill=80,decode=52",
          "prefill=64,decode=68", "prefill=48,decode=84", "prefill=32,decode=100", "prefill=120,decode=12",
          "prefill=16,decode=116", "prefill=88,decode=44"]
OPS = ("triton", "inductor", "inductor-graphs", "cublas", "capture", "replay")


def _mlp(x, w1, w2):
    return torch.nn.functional.silu(x @ w1) @ w2


def test_lane_stress():
    backend = os.environ.get("BULLET_STRESS_BACKEND", "green")
    steps = int(os.environ.get("BULLET_STRESS_STEPS", "60"))
    rng = random.Random(int(os.environ.get("BULLET_STRESS_SEED", "0")))
    torch.manual_seed(0)
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16) / 32
    w2 = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16) / 45
    norm_w = torch.ones(1024, device="cuda", dtype=torch.bfloat16)
    eager_ref = _mlp(x, w1, w2)
    compiled = torch.compile(_mlp, dynamic=False)
    compiled_graphs = torch.compile(_mlp, mode="reduce-overhead", dynamic=False)
    pool = torch.cuda.graph_pool_handle()
    graphs: list[tuple[str, object, torch.Tensor, object]] = []  # (where, graph, output, stream)
    counts = {op: 0 for op in OPS}
    opened: list[str] = []
    with Partitioner(backend) as parts:
        sm_count = parts.device.sm_count
        for step in range(steps):
            split_text = rng.choice(SPLITS)
            lane_name = rng.choice(("prefill", "decode"))
            op = rng.choice(OPS if graphs else OPS[:-1])
            pset = parts.get(SMSplit.parse(split_text))  # opened late, between other work
            if split_text not in opened:
                opened.append(split_text)
            lane = pset.lane(lane_name)
            where = f"step {step}: {op} on {split_text}:{lane_name} ({backend})"
            if op == "capture":
                expect = LaneExpectation(f"{split_text}:{lane_name}", lane.granted,
                                         lane.observed_sms or lane.expected_sms, sm_count)
                fn = rng.choice((_mlp, compiled))  # eager ATen/cuBLAS, or Inductor's Triton kernels
                where += f" ({'inductor' if fn is compiled else 'eager'})"
                with pset.lane_scope(lane_name):
                    graph, out = capture_on_stream(lambda: fn(x, w1, w2), lane.stream, lane.granted, pool,
                                                   check_lane=expect, name=where)
                graphs.append((where, graph, out, lane.stream))
                torch.testing.assert_close(out, eager_ref, rtol=2e-2, atol=2e-2)
            elif op == "replay":
                g_where, graph, out, stream = rng.choice(graphs)
                with torch.cuda.stream(stream):
                    graph.replay()
                stream.synchronize()
                torch.testing.assert_close(out, eager_ref, rtol=2e-2, atol=2e-2, msg=lambda m: f"{g_where}: {m}")
            else:
                with pset.use(lane_name):
                    if op == "triton":
                        y = rms_norm(x, norm_w, 1e-6)
                    elif op == "inductor":
                        y = compiled(x, w1, w2)
                    elif op == "inductor-graphs":
                        y = compiled_graphs(x, w1, w2).clone()
                    else:
                        y = x @ w1
                torch.cuda.synchronize()
                assert torch.isfinite(y.float()).all(), where
            counts[op] += 1
            with pset.lane_scope(lane_name):
                seen = probe.observed_sms(lane.stream, sm_count)
                seen_triton = triton_observed_sms(lane.stream, sm_count)
            allowed = lane.expected_sms if lane.expected_sms is not None else lane.observed_sms
            for kind, ids in (("driver probe", seen), ("triton probe", seen_triton)):
                assert ids <= allowed, (
                    f"{where}: the {kind} ran on SMs {format_ranges(sorted(ids - allowed))} outside the lane's "
                    f"{format_ranges(sorted(allowed))}")
                assert len(ids) == lane.granted, f"{where}: the {kind} ran on {len(ids)} SMs, not {lane.granted}"
    print(f"lane stress ({backend}): {steps} steps over {len(opened)} splits opened late; ops {counts}; "
          f"{len(graphs)} graphs captured and verified")
    assert len(opened) >= 8, f"only {len(opened)} splits were opened; raise BULLET_STRESS_STEPS"
