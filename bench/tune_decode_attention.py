"""Launch settings of our paged decode attention on small partitions (tuning sweep).

For a few decode shapes and SM budgets, time every variant (prefetch or not, block_n,
num_stages, num_warps) and split multiplier on a verified green partition and print TB/s,
with a partition-sized copy as the bandwidth reference, plus each compiled kernel's registers,
spills and shared memory. The winners become the defaults in decode_attention.py / sizing.py.

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


# (block_n, num_stages, num_warps); the first one is the shipped default. Rejected on the H100
# (bench/results/tune-decode-attention-h100-20261126.json, commit 79c29fb): carrying the next
# K/V tile in registers ("prefetch") reached only 28-61% of the copy on 16-56 SMs, against
# 58-97% for Triton's own cp.async pipeline, and is gone from the kernel.
# Round 2 (commit e5955ff): (64, 3, 4) won, limited by occupancy (3 programs of 4 warps per SM:
# 144 registers, 72 KB shared). Round 3 tried smaller tiles and register caps; round 4
# (2bfd717, --variants) found one-warp programs, now the default (first here).
VARIANTS = ((32, 3, 1, None), (64, 3, 4, None), (64, 2, 4, None), (64, 2, 4, 96), (64, 3, 4, 128), (64, 3, 8, None),
            (32, 3, 4, None), (32, 4, 4, None), (32, 5, 4, None), (32, 4, 4, 96), (32, 4, 8, None))
KEYS = ("block_n", "num_stages", "num_warps", "maxnreg")
SMS = (16, 32, 40, 56, 132)
SHAPES = ((128, 4096), (16, 32768))


def compiled_kernels() -> dict:
    """Triton's compiled decode kernels so far, by id: registers, spills, shared bytes."""
    out = {}
    try:
        for cache in decode_attention._decode_split_kernel.device_caches.values():
            for k in cache[0].values():
                md = k.metadata
                out[id(k)] = {"n_regs": getattr(k, "n_regs", None), "n_spills": getattr(k, "n_spills", None),
                              "shared": getattr(md, "shared", None), "num_warps": getattr(md, "num_warps", None),
                              "num_stages": getattr(md, "num_stages", None)}
    except Exception as exc:  # private API: report, never fail the sweep over it
        out["error"] = repr(exc)
    return out


def parse_variants(text: str) -> tuple:
    """``"64,3,4;32,3,1,96"`` -> ((64, 3, 4, None), (32, 3, 1, 96))."""
    out = []
    for part in filter(None, text.split(";")):
        nums = [int(x) for x in part.split(",")]
        if len(nums) not in (3, 4):
            raise SystemExit(f"variant {part!r}: write block_n,num_stages,num_warps[,maxnreg]")
        out.append((*nums, None) if len(nums) == 3 else tuple(nums))
    return tuple(out)


def main() -> int:
    import argparse

    global VARIANTS
    ap = argparse.ArgumentParser(description="decode attention launch-setting sweep")
    ap.add_argument("--variants", help="block_n,num_stages,num_warps[,maxnreg] separated by ';' (first = reference)")
    ap.add_argument("--shapes", help="batch x context pairs, e.g. 16x1024,16x4096")
    ap.add_argument("--sms", help="SM counts, e.g. 16,32,40")
    ap.add_argument("--splits", help="split counts to try instead of 1 and 1/2/4x the sizing's pick, e.g. 1,2,4,8")
    args = ap.parse_args()
    global SHAPES, SMS
    if args.variants:
        VARIANTS = parse_variants(args.variants)
    if args.shapes:
        SHAPES = tuple(tuple(int(x) for x in p.split("x")) for p in args.shapes.split(","))
    if args.sms:
        SMS = tuple(int(x) for x in args.sms.split(","))
    fixed_splits = [int(x) for x in args.splits.split(",")] if args.splits else None
    if not torch.cuda.is_available():
        print("tune_decode_attention: no GPU here")
        return 1
    cfg = Llama()
    rows, kernels = [], {}
    default = dict(zip(KEYS, VARIANTS[0]))
    with Partitioner("green") as parts:
        for sms in SMS:
            lane = parts.get(SMSplit(decode=sms)).lane("decode") if sms < parts.device.sm_count else None
            stream = lane.stream if lane else torch.cuda.Stream()
            granted = lane.granted if lane else parts.device.sm_count
            src = torch.randn(1 << 28, device="cuda")
            dst = torch.empty_like(src)
            with sm_budget(granted):
                copy = tbps(2 * src.nbytes, time_graph([lambda: persistent_copy(src, dst)] * 2, stream, 10)["median_ms"])
            del src, dst
            for b, ctx in SHAPES:
                caches = [paged_kv(cfg, b, ctx) for _ in range(2)]
                q = torch.randn(b, cfg.heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
                base = decode_kv_splits(b, cfg.kv_heads, cfg.group, ctx, granted)
                candidates = fixed_splits or sorted({1, base, 2 * base, 4 * base})
                for (bn, st, nw, reg), splits in itertools.product(VARIANTS, candidates):
                    kw = dict(block_n=bn, num_stages=st, num_warps=nw, maxnreg=reg, num_splits=splits)
                    calls = [lambda c=c: decode_attention.paged_decode_attention(q, *c, 0.088, **kw) for c in caches] * 2
                    before = compiled_kernels()
                    try:
                        with sm_budget(granted):
                            t = time_graph(calls, stream, 10)
                    except Exception as exc:  # e.g. out of shared memory for big tiles
                        rows.append({"sms": granted, "batch": b, "ctx": ctx, **kw, "error": str(exc)[:200]})
                        torch.cuda.synchronize()
                        continue
                    new = {k: v for k, v in compiled_kernels().items() if k not in before}
                    for v in new.values():
                        kernels[f"block_n={bn} stages={st} warps={nw} maxnreg={reg}"] = v
                    bw = tbps(attention_bytes(cfg, b, ctx), t["median_ms"])
                    rows.append({"sms": granted, "batch": b, "ctx": ctx, **kw, "ms": t["median_ms"], "tbps": bw,
                                 "pct_of_copy": 100 * bw / copy, "copy_tbps": copy})
                del caches
                mine = [r for r in rows if r.get("batch") == b and r.get("ctx") == ctx and r["sms"] == granted and "tbps" in r]
                best = max(mine, key=lambda r: r["tbps"])
                dflt = next((r for r in mine if all(r[k] == v for k, v in default.items()) and r["num_splits"] == base), best)
                print(f"{granted:4d} SMs b{b} ctx{ctx}: copy {copy:.2f} TB/s; default {dflt['tbps']:.2f} TB/s "
                      f"({dflt['pct_of_copy']:.0f}%); best {best['tbps']:.2f} TB/s ({best['pct_of_copy']:.0f}%) with "
                      f"block_n={best['block_n']} stages={best['num_stages']} maxnreg={best['maxnreg']} "
                      f"warps={best['num_warps']} splits={best['num_splits']} (base {base})", flush=True)
    top = sorted((r for r in rows if "tbps" in r), key=lambda r: -r["pct_of_copy"])[:10]
    for r in top:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    for name, k in kernels.items():
        print(name, k)
    # per variant: the worst case over shapes and SM counts of its best split multiplier
    per_variant = {}
    for (bn, st, nw, reg) in VARIANTS:
        worst = None
        for sms_ in {r["sms"] for r in rows}:
            for b, ctx in SHAPES:
                cands = [r["pct_of_copy"] for r in rows if "tbps" in r and r["sms"] == sms_ and r["batch"] == b and r["ctx"] == ctx
                         and (r["block_n"], r["num_stages"], r["num_warps"], r["maxnreg"]) == (bn, st, nw, reg)]
                if cands:
                    worst = min(worst, max(cands)) if worst is not None else max(cands)
        per_variant[f"block_n={bn} stages={st} warps={nw} maxnreg={reg}"] = worst
    path = results.write("tune-decode-attention", rows, {"best": top[0] if top else None, "worst_pct_of_copy_by_variant": per_variant,
                                                          "compiled": kernels})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
