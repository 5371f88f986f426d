"""Launch settings of our paged decode attention on small partitions (tuning sweep).

For a few decode shapes and SM budgets, time every (block_n, num_stages, num_warps, splits
multiplier) on a verified green partition and print TB/s, with a partition-sized copy as the
bandwidth reference. The winners become the defaults in decode_attention.py / sizing.py.

    python bench/tune_decode_attention.py
"""

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_decode import Llama, attention_bytes, paged_kv, persistent_copy, tbps, time_graph  # noqa: E402

from bullet_kernels import results  # noqa: E402
from bullet_kernels.kernels import decode_attention  # noqa: E402
from bullet_kernels.kernels.sizing import decode_kv_splits, sm_budget  # noqa: E402
from bullet_kernels.partition import Partitioner, SMSplit  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("tune_decode_attention: no GPU here")
        return 1
    cfg = Llama()
    rows = []
    with Partitioner("green") as parts:
        for sms in (16, 40):
            lane = parts.get(SMSplit(decode=sms)).lane("decode")
            src = torch.randn(1 << 28, device="cuda")
            dst = torch.empty_like(src)
            with sm_budget(lane.granted):
                copy = tbps(2 * src.nbytes, time_graph([lambda: persistent_copy(src, dst)] * 2, lane.stream, 10)["median_ms"])
            del src, dst
            for b, ctx in ((128, 4096), (16, 32768)):
                caches = [paged_kv(cfg, b, ctx) for _ in range(2)]
                q = torch.randn(b, cfg.heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
                base = decode_kv_splits(b, cfg.kv_heads, cfg.group, ctx, lane.granted)
                for bn, st, nw, mult in itertools.product((32, 64, 128), (2, 3, 4), (4, 8), (1, 2, 4)):
                    kw = dict(block_n=bn, num_stages=st, num_warps=nw, num_splits=base * mult)
                    calls = [lambda c=c: decode_attention.paged_decode_attention(q, *c, 0.088, **kw) for c in caches] * 2
                    try:
                        with sm_budget(lane.granted):
                            t = time_graph(calls, lane.stream, 10)
                    except Exception as exc:  # e.g. out of shared memory for big tiles
                        rows.append({"sms": lane.granted, "batch": b, "ctx": ctx, **kw, "error": str(exc)[:200]})
                        torch.cuda.synchronize()
                        continue
                    bw = tbps(attention_bytes(cfg, b, ctx), t["median_ms"])
                    rows.append({"sms": lane.granted, "batch": b, "ctx": ctx, **kw, "ms": t["median_ms"], "tbps": bw, "pct_of_copy": 100 * bw / copy})
                del caches
                best = max((r for r in rows if r.get("batch") == b and r.get("ctx") == ctx and r["sms"] == lane.granted and "tbps" in r), key=lambda r: r["tbps"])
                default = next(r for r in rows if r["sms"] == lane.granted and r["batch"] == b and r["ctx"] == ctx
                               and r["block_n"] == 64 and r["num_stages"] == 3 and r["num_warps"] == 4 and r["num_splits"] == base)
                print(f"{lane.granted:4d} SMs b{b} ctx{ctx}: copy {copy:.2f} TB/s; default {default['tbps']:.2f} TB/s; "
                      f"best {best['tbps']:.2f} TB/s ({best['pct_of_copy']:.0f}%) with block_n={best['block_n']} "
                      f"stages={best['num_stages']} warps={best['num_warps']} splits={best['num_splits']} (base {base})", flush=True)
    top = sorted((r for r in rows if "tbps" in r), key=lambda r: -r["pct_of_copy"])[:10]
    for r in top:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    path = results.write("tune-decode-attention", rows, {"best": top[0] if top else None})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
