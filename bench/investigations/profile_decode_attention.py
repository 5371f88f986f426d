"""Run our decode attention on a small green partition, eagerly, for Nsight Compute.

    ncu --section SpeedOfLight --section WarpStateStats --section Occupancy \
        -k regex:decode_split_kernel -c 2 python3 bench/investigations/profile_decode_attention.py --sms 32

Not a benchmark (ncu serialises and replays kernels): it answers *why* a launch setting is slow
on few SMs (issue-bound, waiting on memory, or occupancy-bound). Llama-3.1-8B decode shapes.
"""

import argparse
import math
import sys

import torch

from bullet_kernels.kernels import decode_attention, sm_budget
from bullet_kernels.kernels.sizing import decode_kv_splits
from bullet_kernels.partition import Partitioner, SMSplit

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16


def paged_kv(batch: int, ctx: int):
    """A scattered paged cache holding ``ctx`` tokens for each of ``batch`` sequences."""
    per_seq = math.ceil(ctx / PAGE)
    pages = batch * per_seq + 1
    kc = torch.randn(pages, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    table = torch.randperm(pages - 1, device="cuda")[: batch * per_seq].view(batch, per_seq).int()
    return kc, vc, table, torch.full((batch,), ctx, dtype=torch.int32, device="cuda")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--block-n", type=int, default=32)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--warps", type=int, default=1)
    ap.add_argument("--splits-mult", type=int, default=1, help="multiply the sized split count")
    a = ap.parse_args()
    with Partitioner("green") as parts:
        pset = parts.get(SMSplit(decode=a.sms))
        granted = pset.lane("decode").granted
        kc, vc, table, lens = paged_kv(a.batch, a.ctx)
        q = torch.randn(a.batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        splits = decode_kv_splits(a.batch, KV_HEADS, HEADS // KV_HEADS, a.ctx, granted) * a.splits_mult
        torch.cuda.synchronize()
        with pset.use("decode"), sm_budget(granted):
            for _ in range(3):
                decode_attention.paged_decode_attention(q, kc, vc, table, lens, HEAD_DIM**-0.5, num_splits=splits,
                                                        block_n=a.block_n, num_stages=a.stages, num_warps=a.warps)
        torch.cuda.synchronize()
    print(f"ran on {granted} SMs, splits {splits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
