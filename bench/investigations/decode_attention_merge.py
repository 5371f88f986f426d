"""Fused or separate split merge in our paged decode attention, per lane (issue #11).

Short decode attention (batch 1-16 at 1k context) reaches only 32-62% of a 16-48 SM lane's copy
bandwidth; the merge kernel's launch and ramp are part of that. ``merge="fused"`` lets the last
program of each KV-head group merge in the split kernel's own launch. This measures whether it
wins, and whether more splits pay once the merge costs no launch:

- lanes of 16, 32 and 48 SMs and the whole GPU (one-lane green splits, all opened and verified
  before other GPU work), each lane's copy bandwidth measured on it
  (:func:`bullet_kernels.measure.copy_tbps`);
- Llama-3.1-8B decode attention (32 query heads, 8 KV heads, head dim 128, 16-token pages,
  bf16, scattered pages, random data) at batch 1, 4, 16, 32, 128 and context 1024, 4096, 16384;
- per lane and shape, each variant captured as one CUDA graph of ``--calls`` calls (more where
  one cache is small: calls rotate through cache copies of >= 256 MB in all, so replays read
  K/V from HBM as a real step does, not from L2) and replayed:
  ``separate@S`` and ``fused@S`` at the sized split count S, ``fused@2S`` and ``fused@4S``
  (capped at the sizing's MAX_SPLITS and one 32-token tile per split), and ``fused-kept@S``
  (a counter buffer made once and left zeroed by the kernel: no fill kernel per call, which
  shows what the fresh counters of the default cost).

Rows: us per call, % of the lane's copy bandwidth for the K/V bytes read, SM clock and power
(NVML) while the variant was timed. A table goes to stdout, the JSON to ``--out``.

    python3 bench/investigations/decode_attention_merge.py [--quick] [--out PATH] [--sms 16,32,48,all]

The full grid takes about 2-3 minutes on an H200 (most of it Triton compiles and captures).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time
from pathlib import Path

BENCHMARK = "decode-attention-merge"
HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
BLOCK_N = 32  # the kernel's default tile: a split shorter than one tile only adds empty programs
GRID = {
    "full": {"sms": (16, 32, 48, "all"), "batch": (1, 4, 16, 32, 128), "context": (1024, 4096, 16384)},
    "quick": {"sms": (16, 32, "all"), "batch": (1, 16, 128), "context": (1024, 4096)},
}
ROTATE_BYTES = 256 << 20  # cache copies per graph: several times the H200's L2
MAX_CALLS = 64
MIN_TIMED_MS = 40.0  # replays per variant: enough for this much GPU time (at least 3, at most 50)
VARIANTS = ("separate@S", "fused@S", "fused@2S", "fused@4S", "fused-kept@S")


def parse_sms(text: str) -> tuple:
    out = []
    for item in text.split(","):
        item = item.strip()
        if item == "all":
            out.append("all")
        elif item.isdigit() and int(item) > 0:
            out.append(int(item))
        else:
            raise argparse.ArgumentTypeError(f"{item!r} is not a positive SM count or 'all' (e.g. 16,32,all)")
    return tuple(out)


def parse_args(argv=None) -> argparse.Namespace:
    from bullet_kernels.partition import BACKENDS

    first, _, rest = __doc__.partition("\n")
    ap = argparse.ArgumentParser(description=first, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=rest.strip())
    ap.add_argument("--quick", action="store_true", help="fewer lanes and shapes (%s)" % GRID["quick"])
    ap.add_argument("--sms", type=parse_sms, default=None, metavar="N,N,...",
                    help="lanes to measure, 'all' for the whole GPU (default 16,32,48,all; quick 16,32,all)")
    ap.add_argument("--calls", type=int, default=20, help="calls per captured graph (default 20; more where "
                    "cache copies must rotate to defeat L2, up to %d)" % MAX_CALLS)
    ap.add_argument("--backend", choices=BACKENDS, default="green", help="partition backend (default green)")
    ap.add_argument("--out", default=None, metavar="PATH",
                    help="results JSON (default $OUT/ or /tmp/ + decode-attention-merge-<gpu>-<yyyymmdd>.json)")
    a = ap.parse_args(argv)
    if a.calls < 1:
        ap.error(f"--calls must be >= 1, got {a.calls}")
    return a


def split_cap(context: int) -> int:
    from bullet_kernels.kernels import sizing

    return max(1, min(sizing.MAX_SPLITS, context // BLOCK_N))


def variant_splits(sized: int, context: int) -> dict[str, int]:
    """Split count per variant; a more-splits variant the cap makes equal to a smaller one is left out."""
    cap = split_cap(context)
    out = {"separate@S": sized, "fused@S": sized}
    for name, mult in (("fused@2S", 2), ("fused@4S", 4)):
        if min(cap, mult * sized) not in (out["fused@S"], out.get("fused@2S")):
            out[name] = min(cap, mult * sized)
    return {**out, "fused-kept@S": sized}


def kv_bytes(batch: int, context: int) -> int:
    """K and V of every sequence read once (bf16)."""
    return 2 * batch * context * KV_HEADS * HEAD_DIM * 2


def make_inputs(batch: int, context: int):
    """``(q, caches)``: a query batch and enough scattered paged caches to rotate through."""
    import torch

    copies = max(1, min(MAX_CALLS, math.ceil(ROTATE_BYTES / kv_bytes(batch, context))))
    pages_per_seq = math.ceil(context / PAGE)
    pages = batch * pages_per_seq + 1
    caches = []
    for _ in range(copies):
        kc = torch.randn(pages, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        table = torch.randperm(pages - 1, device="cuda")[: batch * pages_per_seq].view(batch, pages_per_seq).int()
        caches.append((kc, vc, table, torch.full((batch,), context, dtype=torch.int32, device="cuda")))
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return q, caches


def variant_calls(variant: str, splits: int, q, caches, calls: int):
    import torch

    from bullet_kernels.kernels import decode_attention

    merge = variant.split("@")[0].removesuffix("-kept")
    counters = None
    if variant.startswith("fused-kept"):  # zeros made once; every call leaves them zeroed
        counters = torch.zeros(q.shape[0] * KV_HEADS, dtype=torch.int32, device=q.device)
    out = torch.empty_like(q)

    def call(cache):
        decode_attention.paged_decode_attention(q, *cache, HEAD_DIM**-0.5, out=out, num_splits=splits,
                                                merge=merge, merge_counters=counters)

    n = min(MAX_CALLS, max(calls, len(caches)))  # every cache copy at least once
    return [lambda c=caches[i % len(caches)]: call(c) for i in range(n)]


def time_variant(lane, calls) -> dict:
    """Capture ``calls`` as one graph on the lane, replay it; per-call statistics plus NVML fields."""
    import torch

    from bullet_kernels import measure

    torch.cuda.synchronize()
    with lane["use"]() as stream:
        graph = measure.capture_graph(calls, stream)
    probe = measure.EventTimer(graph.replay, stream, units=len(calls))
    probe.warmup()
    probe.run(1)
    per_replay_ms = probe.stats()["median_ms"] * len(calls)
    replays = max(3, min(50, math.ceil(MIN_TIMED_MS / max(per_replay_ms, 1e-3))))
    timer = measure.EventTimer(graph.replay, stream, calls_per_round=replays, units=len(calls))
    with measure.GpuMonitor() as gpu:
        stats = timer.run(1)
    del graph
    return {**stats, "calls_per_graph": len(calls), "replays": replays, **gpu.summary()}


def open_lanes(backend: str, sms_list, full_sms: int):
    """Every lane opened (and verified) first: a green split first opened after other GPU work
    has run was seen on an earlier split's SMs (docs/green-contexts.md)."""
    import contextlib

    from bullet_kernels.kernels import sm_budget
    from bullet_kernels.partition import Partitioner
    from bullet_kernels.sweep import LANE, lane_split

    parts = Partitioner(backend)
    lanes = []
    for sms in sms_list:
        n = full_sms if sms == "all" else min(int(sms), full_sms)
        pset = parts.get(lane_split(n))
        granted = pset.lane(LANE).granted

        @contextlib.contextmanager
        def use(pset=pset, granted=granted):
            with pset.use(LANE) as stream, sm_budget(granted):
                yield stream

        lanes.append({"sms_asked": sms, "sms": granted, "use": use})
    return parts, lanes


def measure_copy(lane) -> dict:
    from bullet_kernels import measure

    with measure.GpuMonitor() as gpu, lane["use"]():
        copy = measure.copy_tbps(sms=lane["sms"])
    return {**copy, **{f"copy_{k}": v for k, v in gpu.summary().items()}}


def fmt(v, spec: str, width: int) -> str:
    return format(v, spec).rjust(width) if isinstance(v, (int, float)) else "n/a".rjust(width)


def table(lanes: list[dict], rows: list[dict]) -> str:
    lines = [f"lane {r['sms']:>3} SMs: copy {r['copy_tbps']:.2f} TB/s ({r['copy_impl']})" for r in lanes]
    head = f"{'SMs':>4} {'batch':>5} {'ctx':>6} {'S':>3} " + "".join(f"{v:>21}" for v in VARIANTS) + f"{'MHz':>6}{'W':>6}"
    lines += ["us per call (% of lane copy) [splits]", head]
    keys = sorted({(r["sms"], r["batch"], r["context"]) for r in rows})
    for sms, batch, ctx in keys:
        cells = {r["variant"]: r for r in rows if (r["sms"], r["batch"], r["context"]) == (sms, batch, ctx)}
        sized = next(iter(cells.values()))["sized_splits"]
        text = []
        for v in VARIANTS:
            r = cells.get(v)
            if r is None or "error" in r:
                text.append(f"{'error' if r else '-':>21}")
            else:
                text.append(f"{r['us_per_call']:>9.1f} ({r['pct_of_copy']:>3.0f}%) [{r['splits']:>2}]")
        clocks = [r["sm_clock_mhz"] for r in cells.values() if isinstance(r.get("sm_clock_mhz"), (int, float))]
        power = [r["power_w"] for r in cells.values() if isinstance(r.get("power_w"), (int, float))]
        lines.append(f"{sms:>4} {batch:>5} {ctx:>6} {sized:>3} " + "".join(text)
                     + fmt(min(clocks) if clocks else None, ".0f", 6) + fmt(max(power) if power else None, ".0f", 6))
    return "\n".join(lines)


def summarize(rows: list[dict]) -> dict:
    """Per lane: fused@S over separate@S (time ratio) at each shape where the sizing split
    (where S is 1 both are the same launch), and how often each variant was the fastest."""
    out: dict = {}
    keys = sorted({(r["sms"], r["batch"], r["context"]) for r in rows})
    wins: dict = {}
    for sms, batch, ctx in keys:
        cells = {r["variant"]: r for r in rows
                 if (r["sms"], r["batch"], r["context"]) == (sms, batch, ctx) and "error" not in r}
        sep, fused = cells.get("separate@S"), cells.get("fused@S")
        if sep and fused and sep["splits"] > 1:
            out[f"fused_over_separate@{sms}_b{batch}_ctx{ctx}"] = round(fused["median_ms"] / sep["median_ms"], 3)
        if cells:
            best = min(cells.values(), key=lambda r: r["median_ms"])
            wins.setdefault(sms, {}).setdefault(best["variant"], 0)
            wins[sms][best["variant"]] += 1
            out[f"best@{sms}_b{batch}_ctx{ctx}"] = f"{best['variant']} ({best['splits']} splits, {best['pct_of_copy']:.0f}%)"
    for sms, counts in wins.items():
        out[f"fastest_counts@{sms}"] = counts
    ratios = [v for k, v in out.items() if k.startswith("fused_over_separate@")]
    if ratios:
        out["fused_over_separate_median"] = round(statistics.median(ratios), 3)
        out["fused_over_separate_max"] = max(ratios)
    return out


def default_out(device: str) -> Path:
    from bullet_kernels import results

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    return Path(os.environ.get("OUT") or "/tmp") / f"{BENCHMARK}-{results.gpu_slug(device)}-{stamp}.json"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import triton

    from bullet_kernels import results
    from bullet_kernels.kernels import sizing

    if not torch.cuda.is_available():
        print("needs a CUDA GPU (the kernels and the lanes run there)", file=sys.stderr)
        return 2
    grid = GRID["quick" if args.quick else "full"]
    sms_list = args.sms or grid["sms"]
    t0 = time.perf_counter()
    full_sms = torch.cuda.get_device_properties(0).multi_processor_count
    parts, lanes = open_lanes(args.backend, sms_list, full_sms)
    try:
        lane_rows = []
        for lane in lanes:
            row = {"sms_asked": lane["sms_asked"], "sms": lane["sms"], **measure_copy(lane)}
            lane["copy_tbps"] = row["copy_tbps"]
            lane_rows.append(row)
            print(f"lane {lane['sms']} SMs: copy {row['copy_tbps']:.2f} TB/s", flush=True)
        rows = []
        for batch in grid["batch"]:
            for ctx in grid["context"]:
                q, caches = make_inputs(batch, ctx)
                nbytes = kv_bytes(batch, ctx)
                for lane in lanes:  # lanes vary fastest: one shape's inputs serve every lane
                    sized = sizing.decode_kv_splits(batch, KV_HEADS, HEADS // KV_HEADS, ctx, sms=lane["sms"])
                    for variant, splits in variant_splits(sized, ctx).items():
                        base = {"sms_asked": lane["sms_asked"], "sms": lane["sms"], "batch": batch, "context": ctx,
                                "variant": variant, "merge": variant.split("@")[0], "splits": splits,
                                "sized_splits": sized, "kv_bytes": nbytes, "lane_copy_tbps": lane["copy_tbps"]}
                        try:
                            r = time_variant(lane, variant_calls(variant, splits, q, caches, args.calls))
                        except Exception as exc:  # keep the other rows; say what failed
                            rows.append({**base, "error": f"{type(exc).__name__}: {exc}"})
                            print(f"{lane['sms']} SMs b{batch} ctx{ctx} {variant}: {exc}", file=sys.stderr, flush=True)
                            continue
                        tbps = nbytes / (r["median_ms"] * 1e-3) / 1e12
                        rows.append({**base, **r, "us_per_call": r["median_ms"] * 1e3, "kv_tbps": tbps,
                                     "pct_of_copy": 100 * tbps / lane["copy_tbps"]})
                    print(f"{time.perf_counter() - t0:6.0f} s: {lane['sms']} SMs b{batch} ctx{ctx} done", flush=True)
                del q, caches
                torch.cuda.empty_cache()
    finally:
        torch.cuda.synchronize()
        parts.close()
    summary = summarize(rows)
    print(table(lane_rows, rows))
    for k, v in summary.items():
        print(f"  {k}: {v}")
    doc = {"benchmark": BENCHMARK, **results.environment(), "triton": triton.__version__, "backend": args.backend,
           "grid": "quick" if args.quick else "full", "calls": args.calls, "lanes": lane_rows,
           "seconds": round(time.perf_counter() - t0, 1), "rows": rows, "summary": summary}
    results.validate(doc)
    path = Path(args.out) if args.out else default_out(doc["device"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(results.dumps(doc, compact=True) + "\n")
    print(f"wrote {path} ({doc['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
