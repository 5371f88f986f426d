"""Capture the full graph bank of a preset and report time and memory (issue 3).

Bank: for each SM split, decode graphs for every decode batch bucket on the decode lane and
prefill graphs for every token bucket and layer group on the prefill lane; plus the whole-GPU
graphs of both phases (used when the other phase is idle).

    python bench/capture_bank.py                       # llama-3.1-8b, 4 splits + whole GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bullet_kernels import results  # noqa: E402
from bullet_kernels.graph_bank import GraphBank  # noqa: E402
from bullet_kernels.kv_cache import PagedKVCache  # noqa: E402
from bullet_kernels.model_graphs import ModelGraphs  # noqa: E402
from bullet_kernels.models.presets import random_model  # noqa: E402
from bullet_kernels.partition import Partitioner, SMSplit  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-3.1-8b")
    p.add_argument("--splits", nargs="+", default=["prefill=116,decode=16", "prefill=100,decode=32", "prefill=96,decode=36", "prefill=84,decode=48"])
    p.add_argument("--decode-buckets", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--prefill-buckets", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--max-context", type=int, default=4096)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("capture_bank: no GPU here; nothing captured")
        return 1
    model = random_model(args.preset, device="cuda", dtype=torch.bfloat16, max_context=args.max_context)
    kv = PagedKVCache.for_model(model.config, num_pages=64, device="cuda")  # capture reads no real pages
    model.attach_kv_cache(kv)
    torch.cuda.synchronize()
    base = torch.cuda.memory_reserved()
    t0 = time.perf_counter()
    rows = []
    with Partitioner("green") as parts:
        graphs = ModelGraphs(model, GraphBank(parts), decode_buckets=args.decode_buckets,
                             prefill_buckets=args.prefill_buckets, groups=args.groups)
        placements = [(SMSplit.parse(s), lane) for s in args.splits for lane in ("prefill", "decode")]
        placements += [(None, "main")]
        for split, lane in placements:
            phases = ("decode", "prefill") if split is None else (lane,)
            stats = graphs.capture(split, lane, phases=phases, progress=True)
            rows.append({"split": split.key if split else "whole-gpu", "lane": lane, **stats})
            print(f"  {rows[-1]['split']:22s} {lane:8s} {stats['graphs']:4d} graphs {stats['seconds']:6.1f} s "
                  f"{stats['memory_bytes'] / 2**20:8.0f} MiB", flush=True)
        total_s = time.perf_counter() - t0
        total_graphs = len(graphs.bank)
    mem = torch.cuda.memory_reserved() - base
    summary = {"graphs": total_graphs, "capture_seconds": total_s, "memory_bytes": mem}
    path = results.write("capture-bank", rows, summary, args.out, model=args.preset,
                         decode_buckets=args.decode_buckets, prefill_buckets=args.prefill_buckets, groups=args.groups)
    print(f"results: {path}\nfull bank: {total_graphs} graphs in {total_s:.1f} s, {mem / 2**30:.2f} GiB "
          "(static buffers + pools, excluding weights and KV cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
