"""The green cross-lane reproduction (docs/green-contexts.md), one scenario per process.

``BULLET_SCENARIO=late``: splits are opened one after another while Inductor-compiled graphs
run on the earlier ones (what bench_compile did at fa48be4). On the H200 (driver 580) the third
split's 112-SM lane then ran on the earlier 104-SM lane's SMs, and verification refused it.
``BULLET_SCENARIO=upfront``: the same work, but every split is opened and verified first (what
``EngineConfig.splits`` does); every lane and every captured graph must then hold.
tests/test_green_cross_lane_gpu.py runs this file; not collected by a plain ``pytest``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import bullet_kernels
from bullet_kernels import BulletError, Partitioner, SMSplit
from bullet_kernels.partition import probe

pytestmark = pytest.mark.gpu
SPLITS = [SMSplit.parse(s) for s in ("prefill=96,decode=36", "prefill=104,decode=28", "prefill=112,decode=20")]


class Block(torch.nn.Module):
    def __init__(self, dim: int = 2048, heads: int = 16):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.RMSNorm(dim), torch.nn.RMSNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.o = torch.nn.Linear(dim, dim, bias=False)
        self.up = torch.nn.Linear(dim, 8 * dim, bias=False)
        self.down = torch.nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        gate, up = self.up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def _work(parts: Partitioner) -> None:
    """Inductor graphs on the whole GPU, then prefill and decode lanes of each split, concurrently."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(Block() for _ in range(8))).cuda().to(torch.bfloat16).eval()
    fn = torch.compile(model, backend="bullet", dynamic=False)
    prompt = torch.randn(1, 2048, 2048, device="cuda", dtype=torch.bfloat16)
    step = torch.randn(64, 1, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):
            fn(step)
        for split in SPLITS:
            for _ in range(10):
                with bullet_kernels.on_lane("prefill", split, partitioner=parts, join=False):
                    fn(prompt)
                with bullet_kernels.on_lane("decode", split, partitioner=parts, join=False):
                    for _ in range(4):
                        fn(step)
                torch.cuda.synchronize()


def _assert_every_lane_holds(parts: Partitioner) -> None:
    for pset in parts.open_sets():
        for lane in pset.lanes.values():
            seen = probe.observed_sms(lane.stream, pset.device.sm_count)
            assert seen == lane.observed_sms, (pset.split.key, lane.name, len(seen), lane.granted)


def test_scenario():
    scenario = os.environ.get("BULLET_SCENARIO", "")
    with Partitioner("green") as parts:
        if scenario == "upfront":
            for split in SPLITS:
                parts.get(split)
            _work(parts)
            _assert_every_lane_holds(parts)
        elif scenario == "late":
            with pytest.raises(BulletError, match="failed verification") as err:
                _work(parts)
            print(f"refused as measured before: {err.value}")
        else:
            pytest.fail(f"BULLET_SCENARIO must be 'upfront' or 'late', got {scenario!r}")
