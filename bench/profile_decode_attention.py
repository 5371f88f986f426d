"""Run our decode attention on a small green partition, eagerly, for Nsight Compute.

    ncu --section SpeedOfLight --section WarpStateStats --section Occupancy \
        -k regex:_decode_split_kernel -c 2 python bench/profile_decode_attention.py --sms 32

Not a benchmark (ncu serialises and replays kernels): it answers *why* a launch setting is
slow on few SMs (issue-bound, waiting on memory, or occupancy-bound).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_decode import Llama, paged_kv  # noqa: E402

from bullet_kernels.kernels import decode_attention  # noqa: E402
from bullet_kernels.kernels.sizing import decode_kv_splits, sm_budget  # noqa: E402
from bullet_kernels.partition import Partitioner, SMSplit  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--splits-mult", type=int, default=2)
    a = ap.parse_args()
    cfg = Llama()
    with Partitioner("green") as parts:
        lane = parts.get(SMSplit(decode=a.sms)).lane("decode")
        kc, vc, table, lens = paged_kv(cfg, a.batch, a.ctx)
        q = torch.randn(a.batch, cfg.heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
        splits = decode_kv_splits(a.batch, cfg.kv_heads, cfg.group, a.ctx, lane.granted) * a.splits_mult
        torch.cuda.synchronize()
        with parts.get(SMSplit(decode=a.sms)).use("decode"), sm_budget(lane.granted):
            for _ in range(3):
                decode_attention.paged_decode_attention(q, kc, vc, table, lens, 0.088, num_splits=splits, block_n=a.block_n,
                                                        num_stages=a.stages, num_warps=a.warps)
        torch.cuda.synchronize()
    print(f"ran on {lane.granted} SMs, splits {splits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
