"""Per-kernel costs of a layer (bullet_kernels.costs) and the benchmark's layer (bench/layer_ops.py)
on CPU: the costs agree with the whole-step bound, and the layer the roofline benchmark times
computes what a dense, independent Llama layer computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.layer_ops import LayerOps
from bullet_kernels import costs, sweep
from bullet_kernels.kernels import reference
from bullet_kernels.models.config import ModelConfig
from bullet_kernels.models.presets import preset_config

LLAMA_8B = preset_config("llama-3.1-8b")
TINY = ModelConfig(architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0)


def test_kernels_are_named_and_ordered_as_the_layer_runs_them():
    ops = costs.layer_op_costs(LLAMA_8B, "decode", 16, 1024)
    assert tuple(o.name for o in ops) == costs.LAYER_OPS
    assert {o.kind for o in ops} == set(costs.KINDS)


def test_decode_qkv_and_attention_by_hand():
    ops = {o.name: o for o in costs.layer_op_costs(LLAMA_8B, "decode", 16, 1024)}
    qkv = ops["qkv_proj"]  # 6144 x 4096 weight, 16 rows in and out
    assert qkv.weight_bytes == 6144 * 4096 * 2 and qkv.act_bytes == 16 * (4096 + 6144) * 2
    assert qkv.flops == 2 * 16 * 6144 * 4096
    att = ops["attention"]  # K and V of 1024 tokens x 8 KV heads x 128 for 16 sequences; q in, out
    assert att.kv_bytes == 2 * 16 * 1024 * 8 * 128 * 2 and att.act_bytes == 2 * 16 * 4096 * 2
    assert att.flops == 4 * 16 * 32 * 128 * 1024


@pytest.mark.parametrize("batch, context", [(1, 1024), (32, 1024), (128, 4096)])
def test_decode_costs_add_up_to_the_whole_step_bound(batch, context):
    """The step bound (sweep.model_costs) counts the matmul weights once, the K/V read, the LM head:
    so do the kernels, less the activations' round trips, the new tokens' K/V written by rotary
    and the norms' weights (8 KB a norm, which the bound leaves out)."""
    ops = costs.layer_op_costs(LLAMA_8B, "decode", batch, context)
    step = sweep.model_costs(LLAMA_8B, sweep.Workload("decode", batch), context=context)
    lm_head = LLAMA_8B.vocab_size * LLAMA_8B.hidden_size
    layers = LLAMA_8B.num_layers
    read = sum(o.weight_bytes for o in ops if o.kind == "gemm") + {o.name: o for o in ops}["attention"].kv_bytes
    assert layers * read + lm_head * 2 == step["bytes"]
    assert layers * sum(o.flops for o in ops) + 2 * batch * lm_head == step["flops"]
    assert all(o.act_bytes > 0 for o in ops)


def test_prefill_attention_is_causal_per_sequence():
    one = {o.name: o for o in costs.layer_op_costs(LLAMA_8B, "prefill", 2048, 2048)}
    four = {o.name: o for o in costs.layer_op_costs(LLAMA_8B, "prefill", 2048, 512)}
    assert one["attention"].flops == 4 * 32 * 128 * (2048 * 2049 // 2)
    assert four["attention"].flops == 4 * 4 * 32 * 128 * (512 * 513 // 2)  # four short causal sequences
    assert one["qkv_proj"] == four["qkv_proj"]  # GEMMs see tokens, not sequences
    step = sweep.model_costs(LLAMA_8B, sweep.Workload("prefill", 2048), context=0)
    lm_head_one_row = 2 * LLAMA_8B.hidden_size * LLAMA_8B.vocab_size
    kernels = LLAMA_8B.num_layers * sum(o.flops for o in one.values()) + lm_head_one_row
    assert kernels == pytest.approx(step["flops"], rel=1e-3)  # model_costs counts t^2/2 pairs, we t(t+1)/2


@pytest.mark.parametrize("phase, rows, context, message", [
    ("verify", 1, 1, "phase must be one of"),
    ("decode", 0, 1, "rows must be an int >= 1"),
    ("decode", 4, 2.5, "context must be an int >= 1"),
    ("prefill", 1000, 512, "must be whole sequences"),
])
def test_bad_shapes_are_refused(phase, rows, context, message):
    with pytest.raises(ValueError, match=message):
        costs.layer_op_costs(LLAMA_8B, phase, rows, context)


def dense_attention_inputs(ops: LayerOps):
    """The layer up to attention, written out densely: ``(q, k, v, residual)`` per head, rotated."""
    c = ops.config
    h, res = reference.fused_add_rms_norm(ops.x, ops.res, ops.norm_w, c.rms_norm_eps)
    q, k, v = F.linear(h, ops.w["qkv_proj"][0]).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
    q = reference.apply_rotary(q.reshape(-1, c.num_heads, c.head_dim), ops.positions, ops.cos_sin)
    k = reference.apply_rotary(k.reshape(-1, c.num_kv_heads, c.head_dim), ops.positions, ops.cos_sin)
    return q, k, v.reshape(-1, c.num_kv_heads, c.head_dim), res


def dense_after_attention(ops: LayerOps, attn: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """The layer from attention's output on, written out densely."""
    c = ops.config
    o = F.linear(attn.reshape(-1, c.q_size), ops.w["o_proj"][0])
    h, res = reference.fused_add_rms_norm(o, res, ops.norm_w, c.rms_norm_eps)
    return F.linear(reference.silu_and_mul(F.linear(h, ops.w["gate_up_proj"][0])), ops.w["down_proj"][0])


def dense_layer(ops: LayerOps, seqs: int, length: int) -> torch.Tensor:
    """The prefill layer written out densely: per sequence, causal attention over its own tokens."""
    q, k, v, res = dense_attention_inputs(ops)
    group = ops.config.num_heads // ops.config.num_kv_heads
    out = []
    for s in range(seqs):
        rows = slice(s * length, (s + 1) * length)
        qs = q[rows].transpose(0, 1)
        ks, vs = (t[rows].repeat_interleave(group, dim=1).transpose(0, 1) for t in (k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
    return dense_after_attention(ops, torch.cat(out), res)


def test_the_benchmarked_prefill_layer_is_a_llama_layer():
    torch.manual_seed(0)
    ops = LayerOps(TINY, "prefill", 3 * 40, 40, device="cpu", dtype=torch.float32, rotate_bytes=1)
    out, _ = ops.layer()
    torch.testing.assert_close(out, dense_layer(ops, 3, 40), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("phase, rows, context", [("decode", 5, 37), ("prefill", 64, 32)])
def test_every_kernel_alone_runs_on_its_real_shapes(phase, rows, context):
    torch.manual_seed(0)
    ops = LayerOps(TINY, phase, rows, context, device="cpu", dtype=torch.float32, rotate_bytes=1 << 20)
    assert tuple(ops.costs) == costs.LAYER_OPS
    for name in costs.LAYER_OPS:
        calls = ops.op_calls(name)
        assert calls, name
        result = calls[-1]()
        first = result[0] if isinstance(result, tuple) else result
        assert first.shape[0] == rows and torch.isfinite(first).all(), name
    if phase == "decode":  # small caches rotate through copies; each new token has its own slot
        assert len(ops.caches) > 1 and len(set(ops.slots.tolist())) == rows
    with pytest.raises(ValueError, match="no kernel 'lm_head'"):
        ops.op_calls("lm_head")


def dense_decode_layer(ops: LayerOps, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """One decode step written out densely: the new token's K/V put at its sequence's last
    position, attention over each sequence's whole context read back by page table."""
    _, _, table, seq_lens = ops.caches[0]
    q, k, v, res = dense_attention_inputs(ops)
    group = ops.config.num_heads // ops.config.num_kv_heads
    out = []
    for b in range(ops.rows):
        n = int(seq_lens[b])
        keys = reference.gather_kv(k_cache, table[b], n).clone()
        values = reference.gather_kv(v_cache, table[b], n).clone()
        keys[n - 1], values[n - 1] = k[b], v[b]
        scores = torch.einsum("hd,thd->ht", q[b], keys.repeat_interleave(group, dim=1)) * ops.scale
        out.append(torch.einsum("ht,thd->hd", scores.softmax(-1), values.repeat_interleave(group, dim=1)))
    return dense_after_attention(ops, torch.stack(out), res)


def test_the_benchmarked_decode_layer_is_a_llama_layer():
    torch.manual_seed(0)
    ops = LayerOps(TINY, "decode", 5, 37, device="cpu", dtype=torch.float32, rotate_bytes=1)
    k_cache, v_cache = (t.clone() for t in ops.caches[0][:2])  # before the layer writes the new tokens
    out, _ = ops.layer()
    torch.testing.assert_close(out, dense_decode_layer(ops, k_cache, v_cache), rtol=1e-4, atol=1e-4)
