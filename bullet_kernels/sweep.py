"""SM sweep: prefill throughput and decode step latency of a model against partition size.

For each SM count, the model's prefill (per layer group) and decode graphs are captured on a
verified partition of that many SMs and replayed there; times are CUDA-event medians on the
lane's stream. Model FLOP utilisation (prefill) and HBM bandwidth (decode) are reported
against peaks measured in the same run on the whole GPU (a bf16 GEMM and a device copy).

    bullet sweep                     # llama-3.1-8b preset, random weights, green partitions
    bullet sweep --quick             # fewer SM counts
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from . import results
from .batch import SeqChunk, plan_decode, plan_prefill
from .device import describe_state
from .graph_bank import GraphBank
from .kv_cache import PagedKVCache
from .model_graphs import ModelGraphs
from .models.presets import random_model
from .partition import Partitioner, SMSplit

FULL_SMS = (8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128)
QUICK_SMS = (16, 32, 48, 64, 96)


def event_median_ms(fn, stream, reps: int, warmup: int = 1) -> list[float]:
    """Per-replay times (ms) with CUDA events on ``stream``."""
    times = []
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return times


def measured_peaks() -> dict:
    """bf16 GEMM TFLOP/s and device-copy TB/s (bytes read + written) on the whole GPU."""
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = statistics.median(event_median_ms(lambda: a @ b, torch.cuda.current_stream(), 10, 3))
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    c = statistics.median(event_median_ms(lambda: dst.copy_(src), torch.cuda.current_stream(), 10, 3))
    return {"gemm_tflops": 2 * n**3 / (t * 1e-3) / 1e12, "copy_tbps": 2 * src.numel() * 4 / (c * 1e-3) / 1e12}


def model_costs(config, prompt_tokens: int, batch: int, ctx: int) -> dict:
    """FLOPs of one prefill and bytes one decode step must move (weights once, the KV read)."""
    h, layers = config.hidden_size, config.num_layers
    per_layer = h * (config.q_size + 2 * config.kv_size) + config.q_size * h + 3 * h * config.intermediate_size
    linear_params = layers * per_layer
    attn_flops = 4 * (prompt_tokens**2 / 2) * config.num_heads * config.head_dim * layers
    prefill_flops = 2 * linear_params * prompt_tokens + attn_flops + 2 * h * config.vocab_size
    kv_bytes = batch * ctx * layers * 2 * config.kv_size * 2
    weight_bytes = (linear_params + config.vocab_size * h) * 2
    return {"prefill_flops": prefill_flops, "decode_bytes": weight_bytes + kv_bytes}


def run(args) -> dict:
    device, _ = describe_state()
    torch.manual_seed(0)
    max_context = max(args.prompt, args.context + 1) + 64
    model = random_model(args.preset, device="cuda", dtype=torch.bfloat16, max_context=max_context)
    cfg = model.config
    page = 16
    batches = sorted(args.decode_batch)
    pages_needed = -(-args.prompt // page) + sum(batches) * -(-(args.context + 1) // page)
    kv = PagedKVCache.for_model(cfg, num_pages=pages_needed, page_size=page, device="cuda")
    kv._storage.normal_(0, 0.5)  # real-looking KV: never time on zeros
    model.attach_kv_cache(kv)
    max_pages = -(-max_context // page)

    # Plan once on the CPU: one prompt for prefill, `batch` sequences of `context` tokens for decode.
    kv.allocate("prompt", args.prompt)
    prefill_batch = plan_prefill([SeqChunk(kv.pages("prompt"), 0, args.prompt)], page_size=page, max_pages=max_pages, batch_size=1)
    prompt_ids = torch.randint(0, cfg.vocab_size, (args.prompt,))
    decode_plans = {}
    for b in batches:
        chunks = []
        for i in range(b):
            rid = f"d{b}-{i}"
            kv.allocate(rid, args.context + 1)
            chunks.append(SeqChunk(kv.pages(rid), args.context, 1))
        decode_plans[b] = (plan_decode(chunks, page_size=page, max_pages=max_pages), torch.randint(0, cfg.vocab_size, (b,)))

    peaks = measured_peaks()
    sm_counts = [*(QUICK_SMS if args.quick else FULL_SMS), device.sm_count]
    rows = []
    with Partitioner(args.backend) as parts:
        for sms in sm_counts:
            split = SMSplit(main=sms)
            pset = parts.get(split)
            lane = pset.lane("main")
            bank = GraphBank(parts)
            graphs = ModelGraphs(model, bank, decode_buckets=batches, prefill_buckets=[args.prompt], prefill_max_seqs=1, groups=args.groups, max_pages=max_pages, page_size=page)
            cap = graphs.capture(split, "main")
            graphs.load("prefill", prompt_ids.cuda(), prefill_batch.to("cuda"))
            t = event_median_ms(lambda: graphs.run_prefill(args.prompt, (split, "main")), lane.stream, args.reps)
            row = {
                "sms_asked": sms, "sms_granted": lane.granted, "sms_observed": len(lane.observed_sms),
                "capture_s": cap["seconds"], "capture_graphs": cap["graphs"], "capture_bytes": cap["memory_bytes"],
                "prefill_tokens": args.prompt, "prefill_ms": statistics.median(t), "prefill_ms_all": t,
            }
            costs = model_costs(cfg, args.prompt, 0, 0)
            row["prefill_tok_s"] = args.prompt / (row["prefill_ms"] * 1e-3)
            row["prefill_mfu"] = costs["prefill_flops"] / (row["prefill_ms"] * 1e-3) / (peaks["gemm_tflops"] * 1e12)
            for b in batches:
                plan, ids = decode_plans[b]
                graphs.load("decode", ids.cuda(), plan.to("cuda"))
                t = event_median_ms(lambda: graphs.run_decode(b, split, "main"), lane.stream, args.reps * 4)
                ms = statistics.median(t)
                bytes_moved = model_costs(cfg, 0, b, args.context)["decode_bytes"]
                row[f"decode_b{b}_ms"] = ms
                row[f"decode_b{b}_ms_all"] = t
                row[f"decode_b{b}_tbps"] = bytes_moved / (ms * 1e-3) / 1e12
                row[f"decode_b{b}_bw_frac"] = row[f"decode_b{b}_tbps"] / peaks["copy_tbps"]
            rows.append(row)
            bank.close()
            del graphs
            torch.cuda.empty_cache()
            print(_row_text(row, batches), flush=True)
    return {"rows": rows, "peaks": peaks, "batches": batches}


def _row_text(row: dict, batches) -> str:
    dec = "  ".join(f"b{b} {row[f'decode_b{b}_ms']:7.2f} ms {row[f'decode_b{b}_tbps']:4.2f} TB/s" for b in batches)
    return (f"  {row['sms_granted']:4d} SMs  prefill {row['prefill_ms']:8.1f} ms {row['prefill_tok_s']:9.0f} tok/s "
            f"MFU {row['prefill_mfu'] * 100:5.1f}%  {dec}  (capture {row['capture_s']:.1f} s)")


def plot(path_json, data: dict, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    sms = [r["sms_granted"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(sms, [r["prefill_tok_s"] for r in rows], "o-")
    a.set(xlabel="SMs", ylabel="prefill tokens/s", title="prefill throughput")
    for batch in data["batches"]:
        b.plot(sms, [r[f"decode_b{batch}_ms"] for r in rows], "o-", label=f"batch {batch}")
    b.set(xlabel="SMs", ylabel="decode step ms", title="decode step latency")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out = str(path_json).replace(".json", ".png")
    fig.savefig(out, dpi=110)
    return out


def main(args: argparse.Namespace) -> int:
    device, reason = describe_state()
    if device is None:
        print(f"bullet sweep: no GPU ({reason}); the sweep needs one. `bullet info` shows this machine.")
        return 1
    t0 = time.perf_counter()
    data = run(args)
    full = data["rows"][-1]
    summary = {
        "peaks": data["peaks"],
        "full_gpu_prefill_tok_s": full["prefill_tok_s"],
        "full_gpu_prefill_mfu": full["prefill_mfu"],
        **{f"full_gpu_decode_b{b}_ms": full[f"decode_b{b}_ms"] for b in data["batches"]},
        "wall_s": time.perf_counter() - t0,
    }
    for r in data["rows"]:  # smallest partition within 10% of full-GPU decode time
        if all(r[f"decode_b{b}_ms"] <= 1.1 * full[f"decode_b{b}_ms"] for b in data["batches"]):
            summary["smallest_sms_decode_within_10pct"] = r["sms_granted"]
            break
    path = results.write(
        "sm-sweep", data["rows"], summary, args.out, model=args.preset, weights="random bf16",
        prompt_tokens=args.prompt, decode_context=args.context, layer_groups=args.groups, backend=args.backend,
    )
    png = plot(path, data, f"{args.preset} on {results.environment()['device']} ({args.backend} partitions)")
    print(f"results: {path}\nplot: {png}")
    print(json.dumps({k: v for k, v in summary.items() if k != "peaks"}, indent=1))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", type=int, default=2048, help="prefill tokens (one prompt)")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[32, 128])
    p.add_argument("--context", type=int, default=1024, help="KV tokens per decode sequence")
    p.add_argument("--groups", type=int, default=4, help="prefill layer groups (one graph each)")
    p.add_argument("--reps", type=int, default=5)
