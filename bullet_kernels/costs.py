"""What each kernel of one decoder layer must move and compute: the per-kernel roofline.

A kernel's roofline on a lane is ``max(bytes / copy bandwidth, FLOPs / GEMM peak)`` with both
peaks measured on that lane (:func:`bullet_kernels.measure.roofline_fields`). The costs here
are the least each kernel of a Llama-family layer can do, one entry per kernel the model runs
(``models/llama.py``: every op goes through :mod:`bullet_kernels.kernels`):

- bytes: the weights it reads, the KV cache it reads or writes, and its activations read from
  and written to memory once (kernels of a layer pass activations through HBM or L2; a whole
  step's lower bound, :func:`bullet_kernels.sweep.model_costs`, leaves them out, so the sum of
  these is a little higher than that bound);
- FLOPs: tensor-core work only (matmuls and attention's two products): the roofline's compute
  side is the lane's bf16 GEMM peak, which elementwise arithmetic never approaches.

Shapes: ``decode``: ``rows`` sequences, one new token each, each attending to ``context``
tokens (the new one included). ``prefill``: ``rows`` new tokens in sequences of ``context``
tokens each (``rows % context == 0``), no cached prefix, causal.
"""

from __future__ import annotations

import dataclasses

KINDS = ("gemm", "attention", "elementwise")
PHASES = ("decode", "prefill")
# In the order the layer runs them (models/llama.py's DecoderLayer.forward).
LAYER_OPS = ("input_norm", "qkv_proj", "rotary_kv", "attention", "o_proj", "post_norm", "gate_up_proj", "silu_mul",
             "down_proj")
COS_SIN_BYTES = 4  # the rotary table is fp32 (models/llama.py rotary_cos_sin_cache)


@dataclasses.dataclass(frozen=True)
class OpCost:
    name: str
    kind: str  # one of KINDS
    weight_bytes: int
    kv_bytes: int  # KV cache read (attention) or written (rotary_kv)
    act_bytes: int  # activations read and written
    flops: int  # tensor-core FLOPs

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.act_bytes


def layer_op_costs(config, phase: str, rows: int, context: int, dtype_bytes: int = 2) -> list[OpCost]:
    """Per kernel of one layer, in run order (:data:`LAYER_OPS`); see the module docstring."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    for name, v in (("rows", rows), ("context", context), ("dtype_bytes", dtype_bytes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if phase == "prefill" and rows % context:
        raise ValueError(f"prefill rows ({rows} tokens) must be whole sequences of context={context} tokens")
    c, t, e = config, rows, dtype_bytes
    h, q, kv, inter = c.hidden_size, c.q_size, c.kv_size, c.intermediate_size
    qkv = q + 2 * kv

    def gemm(name, n_out, k_in):
        return OpCost(name, "gemm", n_out * k_in * e, 0, t * (k_in + n_out) * e, 2 * t * n_out * k_in)

    norm = dict(kind="elementwise", weight_bytes=h * e, kv_bytes=0, act_bytes=4 * t * h * e, flops=0)  # x, res in; out, res out
    if phase == "decode":
        attn_kv = 2 * t * context * kv * e
        attn_flops = 4 * t * c.num_heads * c.head_dim * context
    else:
        seqs = t // context
        attn_kv = 2 * t * kv * e  # each key and value read at least once
        attn_flops = seqs * 4 * c.num_heads * c.head_dim * (context * (context + 1) // 2)
    return [
        OpCost("input_norm", **norm),
        gemm("qkv_proj", qkv, h),
        # reads q, k, v and their rows of the rotary table; writes rotated q and k (returned) and k, v to the cache
        OpCost("rotary_kv", "elementwise", 0, 2 * t * kv * e, t * (qkv + q + kv) * e + t * c.head_dim * COS_SIN_BYTES, 0),
        OpCost("attention", "attention", 0, attn_kv, 2 * t * q * e, attn_flops),
        gemm("o_proj", h, q),
        OpCost("post_norm", **norm),
        gemm("gate_up_proj", 2 * inter, h),
        OpCost("silu_mul", "elementwise", 0, 0, 3 * t * inter * e, 0),
        gemm("down_proj", h, inter),
    ]
