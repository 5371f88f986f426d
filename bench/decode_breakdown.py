"""Where a decode layer's time goes on small partitions: each op timed alone, per SM count.

The Llama-3.1-8B decode layer of bench_decode.py, split into its ops; each op is captured in
its own CUDA graph on the decode lane of a verified green partition (sm_budget = granted SMs)
and replayed; median of CUDA-event times. Stock ops (cuBLAS, torch SDPA over a contiguous
cache, unfused torch ops) and ours side by side. GEMM weights rotate through >= 256 MB of
copies so L2 does not serve them, as it would not inside a real step.

    python bench/decode_breakdown.py            # ~1 min on an H100 SXM
    python bench/decode_breakdown.py --quick

Writes bench/results/decode_breakdown-<gpu>-<yyyymmdd>.json; prints a table last.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_decode import SMS, Layer, Llama, lanes, rotated_weights, sdpa_decode, time_graph  # noqa: E402

from bullet_kernels.kernels import activation, decode_attention, norm, reference, rotary  # noqa: E402
from bullet_kernels.kernels.sizing import sm_budget  # noqa: E402


def layer_ops(layer: Layer) -> list[tuple[str, str, list]]:
    """``(op, impl, calls)``: each op's inputs are the real shapes of the layer's data flow."""
    c, L = layer.cfg, layer
    eps = 1e-5
    h = L.x
    qkv = F.linear(h, L.w_qkv)
    q, k, v = L._split(qkv)
    attn = torch.randn(L.b, c.heads * c.head_dim, device=h.device, dtype=h.dtype)
    gu = torch.randn(L.b, 2 * c.inter, device=h.device, dtype=h.dtype)
    act = torch.randn(L.b, c.inter, device=h.device, dtype=h.dtype)
    kflat = L.kc.view(-1, c.kv_heads, c.head_dim)
    vflat = L.vc.view(-1, c.kv_heads, c.head_dim)
    q_rot = q.contiguous()

    def gemm(x, n_out, k_in):
        ws = rotated_weights(n_out, k_in, device=x.device, dtype=x.dtype)
        return [lambda w=w: F.linear(x, w) for w in ws]

    def stock_kv_write():
        k_rot = reference.apply_rotary(k, L.positions, L.cos_sin)
        kflat.index_copy_(0, L.slots, k_rot)
        vflat.index_copy_(0, L.slots, v)

    rep = 8  # calls per graph for the small ops
    return [
        ("add_rms_norm", "stock", [lambda: reference.fused_add_rms_norm(h, L.res, L.w_in, eps)] * rep),
        ("add_rms_norm", "ours", [lambda: norm.fused_add_rms_norm(h, L.res, L.w_in, eps)] * rep),
        ("qkv_gemm", "cublas", gemm(h, c.qkv, c.hidden)),
        ("rotary_kv_write", "stock",
         [lambda: (reference.apply_rotary(q, L.positions, L.cos_sin), stock_kv_write())] * rep),
        ("rotary_kv_write", "ours",
         [lambda: rotary.rotary_and_store_kv(q, k, v, L.positions, L.cos_sin, L.kc, L.vc, L.slots)] * rep),
        ("attention", "sdpa", [lambda: sdpa_decode(q_rot, L.k_contig, L.v_contig)] * 2),
        ("attention", "ours",
         [lambda: decode_attention.paged_decode_attention(q_rot, L.kc, L.vc, L.table, L.seq_lens, L.scale)] * 2),
        ("o_gemm", "cublas", gemm(attn, c.hidden, c.heads * c.head_dim)),
        ("gate_up_gemm", "cublas", gemm(h, 2 * c.inter, c.hidden)),
        ("silu_mul", "stock", [lambda: reference.silu_and_mul(gu)] * rep),
        ("silu_mul", "ours", [lambda: activation.silu_and_mul(gu)] * rep),
        ("down_gemm", "cublas", gemm(act, c.hidden, c.inter)),
    ]


STOCK = ("stock", "cublas", "sdpa")


def run(args) -> tuple[list[dict], dict]:
    cfg = Llama()
    part, lane_of = lanes(args.sms, args.backend)
    rows: list[dict] = []
    for b in args.batches:
        layer = Layer(cfg, b, args.ctx)
        ops = layer_ops(layer)
        for n in args.sms:
            granted, stream = lane_of[n]
            for op, impl, calls in ops:
                with sm_budget(granted):
                    t = time_graph(calls, stream, reps=10 if args.quick else 20)
                rows.append({"op": op, "impl": impl, "batch": b, "ctx": args.ctx, "sms_asked": n, "sms": granted, **t})
        del layer, ops
        torch.cuda.empty_cache()
    part.close()

    summary: dict = {}
    for b in args.batches:
        for n in args.sms:
            mine = [r for r in rows if (r["batch"], r["sms_asked"]) == (b, n)]
            stock = {r["op"]: r["median_ms"] for r in mine if r["impl"] in STOCK}
            total = sum(stock.values())
            summary[f"stock_layer_ms_b{b}@{n}"] = round(total, 4)
            top = max(stock, key=stock.get)
            summary[f"stock_top_op_b{b}@{n}"] = f"{top} {100 * stock[top] / total:.0f}%"
    return rows, summary


def table(rows: list[dict]) -> str:
    keys = sorted({(r["batch"], r["sms"]) for r in rows})
    ops = list(dict.fromkeys((r["op"], r["impl"]) for r in rows))
    head = f"{'op':<18}{'impl':<8}" + "".join(f"{f'b{b}@{s}':>11}" for b, s in keys)
    lines = [head, "median ms per call"]
    for op, impl in ops:
        cells = {(r["batch"], r["sms"]): r["median_ms"] for r in rows if (r["op"], r["impl"]) == (op, impl)}
        lines.append(f"{op:<18}{impl:<8}" + "".join(f"{cells.get(k, float('nan')):>11.4f}" for k in keys))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sms", type=lambda s: tuple(int(x) for x in s.split(",")), default=SMS)
    p.add_argument("--batches", type=lambda s: tuple(int(x) for x in s.split(",")), default=None)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--backend", default="green")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    args.batches = args.batches or ((16, 128) if args.quick else (16, 64, 128))
    if not torch.cuda.is_available():
        print("no GPU: decode_breakdown.py needs a CUDA GPU (an H100 for the reference numbers); nothing measured")
        return 0
    from bullet_kernels import results

    t0 = time.time()
    rows, summary = run(args)
    summary["wall_s"] = round(time.time() - t0, 1)
    path = results.write("decode_breakdown", rows, summary, args.out_dir)
    print(table(rows))
    print("summary:\n" + "\n".join(f"  {k}: {v}" for k, v in summary.items()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
