"""The full graph bank of the llama-3.1-8b preset: capture time and memory per placement.

The engine's ModelRunner captures, for each SM split, the decode graphs of every decode batch
bucket on the decode lane and the prefill graphs of every token bucket and layer group on the
prefill lane; then both phases on the whole GPU (used while the other phase is idle). The bank
grows test by test and is kept whole to the end, so the summary is the whole bank's time and
memory (static buffers and pools; weights and KV excluded).

    python3 -m pytest bench/test_capture_bank.py -m gpu [--bench-size full]

Writes bench/results/capture-bank-<gpu>-<yyyymmdd>.json.
"""

from __future__ import annotations

import pytest
import torch

from bullet_kernels import SMSplit
from bullet_kernels.config import EngineConfig
from bullet_kernels.engine import ModelRunner, Placement
from bullet_kernels.models.presets import random_model

BENCHMARK = "capture-bank"
PRESET = "llama-3.1-8b"
MAX_CONTEXT = 4096
SIZES = {
    "quick": {"decode_buckets": (1, 8, 32, 128), "prefill_buckets": (512, 2048),
              "splits": ("prefill=100,decode=32", "prefill=96,decode=36")},
    "full": {"decode_buckets": (1, 2, 4, 8, 16, 32, 64, 128, 256), "prefill_buckets": (512, 1024, 2048, 4096),
             "splits": ("prefill=116,decode=16", "prefill=100,decode=32", "prefill=96,decode=36", "prefill=84,decode=48")},
}


def placements(size: str) -> list[str]:
    """``"<split>:<lane>"`` for each split's two lanes, then ``"whole-gpu"``."""
    return [f"{split}:{lane}" for split in SIZES[size]["splits"] for lane in ("prefill", "decode")] + ["whole-gpu"]


GRID = {size: {"placement": placements(size)} for size in SIZES}


def splits_of(params: dict) -> list[SMSplit]:
    """The split a test captures on (conftest opens them all before any GPU work)."""
    placement = params.get("placement", "whole-gpu")
    return [] if placement == "whole-gpu" else [SMSplit.parse(placement.split(":")[0])]


@pytest.fixture(scope="module")
def runner(bench, recorder):
    sizes = SIZES[bench.size]
    cfg = EngineConfig(decode_buckets=sizes["decode_buckets"], prefill_buckets=sizes["prefill_buckets"],
                       layer_groups=4, backend=bench.backend, kv_num_pages=64)  # capture reads no real pages
    model = random_model(PRESET, device="cuda", dtype=torch.bfloat16, max_context=MAX_CONTEXT)
    recorder.extra.update(model=PRESET, decode_buckets=list(cfg.decode_buckets),
                          prefill_buckets=list(cfg.prefill_buckets), groups=cfg.layer_groups)
    r = ModelRunner(model, cfg, partitioner=bench.partitioner)
    yield r
    r.close()


@pytest.mark.gpu
def test_capture(benchmark, runner, recorder, placement):
    if placement == "whole-gpu":
        where, phases = Placement.WHOLE_GPU, ("decode", "prefill")
    else:
        split, lane = placement.split(":")
        where, phases = Placement(split, lane), (lane,)
    stats = benchmark.pedantic(lambda: runner.capture(where, phases=phases), rounds=1)
    torch.cuda.synchronize()
    row = {"placement": str(where), "phases": list(phases), **stats,
           "memory_reserved_bytes": torch.cuda.memory_reserved()}
    if where.split is not None:
        row["sms"] = runner.partitioner.get(where.split).lane(where.lane).granted
    benchmark.extra_info.update(graphs=stats["graphs"], memory_bytes=stats["memory_bytes"])
    recorder.add(row)
    assert stats["graphs"] > 0


def summarize(rows: list[dict]) -> dict:
    return {
        "graphs": sum(r["graphs"] for r in rows),
        "capture_seconds": sum(r["seconds"] for r in rows),
        "memory_bytes": sum(r["memory_bytes"] for r in rows),
    }


def table(rows: list[dict], summary: dict) -> str:
    lines = [f"  {r['placement']:32s} {r['graphs']:4d} graphs {r['seconds']:6.1f} s {r['memory_bytes'] / 2**20:8.0f} MiB"
             for r in rows]
    lines.append(f"full bank: {summary['graphs']} graphs in {summary['capture_seconds']:.1f} s, "
                 f"{summary['memory_bytes'] / 2**30:.2f} GiB (static buffers + pools; weights and KV excluded)")
    return "\n".join(lines)
