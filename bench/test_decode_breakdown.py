"""Where a decode layer's time goes on small partitions: each op timed alone, per SM count.

The Llama-3.1-8B decode layer of test_decode_partitions.py split into its ops, each captured in
its own CUDA graph on a verified lane (launches sized for the granted SMs) and replayed; stock
ops (cuBLAS, torch SDPA over a contiguous cache, unfused torch ops) and ours side by side. GEMM
weights rotate through >= 256 MB of copies so L2 does not serve them, as inside a real step.

    python3 -m pytest bench/test_decode_breakdown.py -m gpu [--bench-size full]

Writes bench/results/decode_breakdown-<gpu>-<yyyymmdd>.json.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.decode_layer import LLAMA, DecodeLayer, KeepLast, rotated_weights, sdpa_decode
from bullet_kernels.kernels import activation, decode_attention, norm, reference, rotary

BENCHMARK = "decode_breakdown"
CONTEXT = 4096
OPS = (
    ("add_rms_norm", "stock"), ("add_rms_norm", "ours"), ("qkv_gemm", "cublas"),
    ("rotary_kv_write", "stock"), ("rotary_kv_write", "ours"), ("attention", "sdpa"), ("attention", "ours"),
    ("o_gemm", "cublas"), ("gate_up_gemm", "cublas"), ("silu_mul", "stock"), ("silu_mul", "ours"),
    ("down_gemm", "cublas"),
)
STOCK = ("stock", "cublas", "sdpa")
GRID = {
    "quick": {"batch": (16, 128), "op": OPS, "sms": (16, 32, 40, 64, "all")},
    "full": {"batch": (16, 64, 128), "op": OPS, "sms": (16, 24, 32, 40, 48, 64, 96, "all")},
}
REPEAT_SMALL = 8  # calls per graph for the small ops, so each replay is long enough to time


def layer_ops(layer: DecodeLayer) -> dict[tuple[str, str], list]:
    """``{(op, impl): calls}``; each op's inputs have the real shapes of the layer's data flow."""
    c, L = layer.cfg, layer
    eps = 1e-5
    h = L.x
    q, k, v = L.split_heads(F.linear(h, L.w_qkv))
    q_rot = q.contiguous()
    attn = torch.randn(L.b, c.heads * c.head_dim, device=h.device, dtype=h.dtype)
    gu = torch.randn(L.b, 2 * c.inter, device=h.device, dtype=h.dtype)
    act = torch.randn(L.b, c.inter, device=h.device, dtype=h.dtype)
    kflat = L.kc.view(-1, c.kv_heads, c.head_dim)
    vflat = L.vc.view(-1, c.kv_heads, c.head_dim)

    def gemm(x, n_out, k_in):
        return [lambda w=w: F.linear(x, w) for w in rotated_weights(n_out, k_in, device=x.device, dtype=x.dtype)]

    def stock_rotary_kv_write():
        reference.apply_rotary(q, L.positions, L.cos_sin)
        kflat.index_copy_(0, L.slots, reference.apply_rotary(k, L.positions, L.cos_sin))
        vflat.index_copy_(0, L.slots, v)

    small = REPEAT_SMALL
    return {
        ("add_rms_norm", "stock"): [lambda: reference.fused_add_rms_norm(h, L.res, L.w_in, eps)] * small,
        ("add_rms_norm", "ours"): [lambda: norm.fused_add_rms_norm(h, L.res, L.w_in, eps)] * small,
        ("qkv_gemm", "cublas"): gemm(h, c.qkv, c.hidden),
        ("rotary_kv_write", "stock"): [stock_rotary_kv_write] * small,
        ("rotary_kv_write", "ours"):
            [lambda: rotary.rotary_and_store_kv(q, k, v, L.positions, L.cos_sin, L.kc, L.vc, L.slots)] * small,
        ("attention", "sdpa"): [lambda: sdpa_decode(q_rot, L.k_contig, L.v_contig)] * 2,
        ("attention", "ours"):
            [lambda: decode_attention.paged_decode_attention(q_rot, L.kc, L.vc, L.table, L.seq_lens, L.scale)] * 2,
        ("o_gemm", "cublas"): gemm(attn, c.hidden, c.heads * c.head_dim),
        ("gate_up_gemm", "cublas"): gemm(h, 2 * c.inter, c.hidden),
        ("silu_mul", "stock"): [lambda: reference.silu_and_mul(gu)] * small,
        ("silu_mul", "ours"): [lambda: activation.silu_and_mul(gu)] * small,
        ("down_gemm", "cublas"): gemm(act, c.hidden, c.inter),
    }


layers = KeepLast()  # the layer and op inputs of the latest batch


@pytest.fixture(scope="module", autouse=True)
def drop_layers_after_module():
    yield
    layers.clear()


def make_layer(batch: int):
    layer = DecodeLayer(LLAMA, batch, CONTEXT)
    return layer, layer_ops(layer)


@pytest.mark.gpu
def test_op(benchmark, bench, recorder, batch, op, sms):
    name, impl = op
    lane = bench.lane(sms)
    ops = layers.get(batch, lambda: make_layer(batch))[1]
    row = bench.time_graph(benchmark, lane, ops[op])
    recorder.add({"op": name, "impl": impl, "batch": batch, "ctx": CONTEXT, **row})


def summarize(rows: list[dict]) -> dict:
    """Per (batch, SMs): the stock layer's time (sum of its ops) and its largest op."""
    summary: dict = {}
    for b, n in sorted({(r["batch"], r["sms"]) for r in rows}):
        stock = {r["op"]: r["median_ms"] for r in rows if (r["batch"], r["sms"]) == (b, n) and r["impl"] in STOCK}
        if not stock:
            continue
        total = sum(stock.values())
        top = max(stock, key=stock.get)
        summary[f"stock_layer_ms_b{b}@{n}"] = round(total, 4)
        summary[f"stock_top_op_b{b}@{n}"] = f"{top} {100 * stock[top] / total:.0f}%"
    return summary


def table(rows: list[dict], summary: dict) -> str:
    keys = sorted({(r["batch"], r["sms"]) for r in rows})
    ops = list(dict.fromkeys((r["op"], r["impl"]) for r in rows))
    lines = [f"{'op':<18}{'impl':<8}" + "".join(f"{f'b{b}@{s}':>11}" for b, s in keys), "median ms per call"]
    for op, impl in ops:
        cells = {(r["batch"], r["sms"]): r["median_ms"] for r in rows if (r["op"], r["impl"]) == (op, impl)}
        lines.append(f"{op:<18}{impl:<8}" + "".join(f"{cells.get(k, float('nan')):>11.4f}" for k in keys))
    return "\n".join(lines)
