"""One decoder layer of a model config as the engine runs it, kernel by kernel (bench helpers).

:class:`LayerOps` builds the inputs of one layer at one shape (``decode``: ``rows`` sequences
attending to ``context`` tokens; ``prefill``: ``rows`` tokens in sequences of ``context``) and
hands out graph-safe callables through the same dispatch API the model uses
(:mod:`bullet_kernels.kernels`, so ``BULLET_LINEAR`` and ``BULLET_KERNELS`` apply):

- :meth:`op_calls` ``(name)``: the calls that time one kernel alone. GEMM weights and decode KV
  caches rotate through copies of at least ``rotate_bytes`` so a replay does not find them in
  L2 (a real step reads them from HBM); the small elementwise kernels are repeated, so a replay
  is long enough to time, on inputs that stay in L2 as they do between a step's kernels;
- :meth:`layer`: the whole layer, the kernels in order on one set of data, the real data flow.

Costs per kernel: :func:`bullet_kernels.costs.layer_op_costs` (same names, same order). On a
CPU the dispatch runs the reference ops, which is how the CPU tests check this file.
"""

from __future__ import annotations

import math
import types

import torch

from bench.decode_layer import ROTATE_BYTES, paged_kv, rotated_weights
from bullet_kernels import costs, kernels
from bullet_kernels.models.llama import rotary_cos_sin_cache

PAGE_SIZE = 16
REPEAT_SMALL = 8  # calls per graph for an elementwise kernel
MAX_CACHE_COPIES = 4


class LayerOps:
    def __init__(self, config, phase: str, rows: int, context: int, device="cuda", dtype=torch.bfloat16,
                 rotate_bytes: int = ROTATE_BYTES):
        self.config, self.phase, self.rows, self.context = config, phase, rows, context
        self.costs = {op.name: op for op in costs.layer_op_costs(config, phase, rows, context)}
        c, t = config, rows
        h, q, kv, inter = c.hidden_size, c.q_size, c.kv_size, c.intermediate_size

        def rnd(*shape):
            return torch.randn(*shape, device=device, dtype=dtype) / math.sqrt(shape[-1])

        def weights(n_out, k_in):  # copies enough to defeat L2 when timed alone; copy 0 serves the layer
            return rotated_weights(n_out, k_in, min_bytes=rotate_bytes, device=device, dtype=dtype)

        self.w = {"qkv_proj": weights(q + 2 * kv, h), "o_proj": weights(h, q),
                  "gate_up_proj": weights(2 * inter, h), "down_proj": weights(h, inter)}
        self.norm_w = torch.ones(h, device=device, dtype=dtype)
        self.x, self.res = rnd(t, h), rnd(t, h)
        self.eps, self.scale = c.rms_norm_eps, c.head_dim**-0.5

        seqs = t if phase == "decode" else t // context
        cache_cfg = types.SimpleNamespace(kv_heads=c.num_kv_heads, head_dim=c.head_dim, page_size=PAGE_SIZE)
        one_cache = 2 * seqs * context * kv * torch.finfo(dtype).bits // 8
        copies = 1 if phase == "prefill" else max(1, min(MAX_CACHE_COPIES, math.ceil(rotate_bytes / one_cache)))
        self.caches = [paged_kv(cache_cfg, seqs, context, device, dtype) for _ in range(copies)]
        _, _, table, seq_lens = self.caches[0]
        if phase == "decode":  # the new token sits at the last position of each sequence
            self.positions = (seq_lens - 1).long()
            self.slots = self.slots_of(table, self.positions, torch.arange(seqs, device=device))
            self.cu_seqlens = None
        else:
            self.positions = torch.arange(context, device=device).repeat(seqs)
            owner = torch.arange(seqs, device=device).repeat_interleave(context)
            self.slots = self.slots_of(table, self.positions, owner)
            self.cu_seqlens = torch.arange(0, t + 1, context, device=device, dtype=torch.int32)
        self.cos_sin = rotary_cos_sin_cache(c, context + 1, device)
        # Inputs of the kernels after the first, shaped as the data flow makes them.
        self.qkv = rnd(t, q + 2 * kv)
        self.attn_out = rnd(t, q)
        self.gate_up = rnd(t, 2 * inter)
        self.act = rnd(t, inter)

    @staticmethod
    def slots_of(table, positions, owner):
        """Cache slots of the tokens at ``positions`` of sequences ``owner``."""
        return table[owner, positions // PAGE_SIZE].long() * PAGE_SIZE + positions % PAGE_SIZE

    def split_heads(self, qkv):
        """q, k, v views of the QKV projection's output, per head (as the model splits it)."""
        c = self.config
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        return (q.view(-1, c.num_heads, c.head_dim), k.view(-1, c.num_kv_heads, c.head_dim),
                v.view(-1, c.num_kv_heads, c.head_dim))

    def attention(self, q, cache):
        """The phase's attention kernel over one cache copy."""
        kc, vc, table, seq_lens = cache
        if self.phase == "decode":
            return kernels.paged_decode_attention(q, kc, vc, table, seq_lens, self.scale)
        return kernels.paged_prefill_attention(q, kc, vc, table, self.cu_seqlens, seq_lens, self.scale)

    def rotary(self, q, k, v, cache):
        """Rotary on q and k, k and v written to the cache; returns the rotated q."""
        kc, vc, _, _ = cache
        return kernels.rotary_and_store_kv(q, k, v, self.positions, self.cos_sin, kc, vc, self.slots)[0]

    def op_calls(self, name: str) -> list:
        """The calls that time kernel ``name`` alone (one graph replays them back to back)."""
        if name not in costs.LAYER_OPS:
            raise ValueError(f"no kernel {name!r}; kernels: {', '.join(costs.LAYER_OPS)}")
        if name in self.w:
            x = {"qkv_proj": self.x, "o_proj": self.attn_out, "gate_up_proj": self.x, "down_proj": self.act}[name]
            return [lambda w=w, x=x: self.linear(x, w) for w in self.w[name]]
        if name == "attention":
            q = self.split_heads(self.qkv)[0].contiguous()
            calls = [lambda cache=cache: self.attention(q, cache) for cache in self.caches]
            return (calls * 2)[: max(2, len(calls))]
        small = {
            "input_norm": lambda: kernels.fused_add_rms_norm(self.x, self.res, self.norm_w, self.eps),
            "post_norm": lambda: kernels.fused_add_rms_norm(self.attn_out, self.res, self.norm_w, self.eps),
            "rotary_kv": lambda: self.rotary(*self.split_heads(self.qkv), self.caches[0]),
            "silu_mul": lambda: kernels.silu_and_mul(self.gate_up),
        }[name]
        return [small] * REPEAT_SMALL

    def linear(self, x, w):
        """A GEMM of this layer's phase: the GEMM ``BULLET_LINEAR`` picks for it, as in the model."""
        with kernels.gemm_phase(self.phase):
            return kernels.linear(x, w)

    def layer(self):
        """The layer's kernels in order, on one set of data (what one layer of a step runs)."""
        c, cache = self.config, self.caches[0]
        h, res = kernels.fused_add_rms_norm(self.x, self.res, self.norm_w, self.eps)
        q = self.rotary(*self.split_heads(self.linear(h, self.w["qkv_proj"][0])), cache)
        o = self.linear(self.attention(q, cache).reshape(-1, c.q_size), self.w["o_proj"][0])
        h, res = kernels.fused_add_rms_norm(o, res, self.norm_w, self.eps)
        up = kernels.silu_and_mul(self.linear(h, self.w["gate_up_proj"][0]))
        return self.linear(up, self.w["down_proj"][0]), res
