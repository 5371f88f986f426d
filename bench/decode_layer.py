"""Llama-3.1-8B decode shapes and one decoder layer at decode, stock and ours (bench helpers).

Shared by test_decode_partitions.py and test_decode_breakdown.py. Everything here is built on
the public kernels API; "stock" means cuBLAS, torch SDPA over a contiguous cache (no paging:
generous to stock) and unfused torch ops.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from bullet_kernels.kernels import activation, decode_attention, norm, reference, rotary

BF16 = torch.bfloat16
ROTATE_BYTES = 256 << 20  # several times an H100's or H200's L2: replays do not hit in L2


@dataclasses.dataclass(frozen=True)
class Llama:
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    inter: int = 14336
    vocab: int = 128256
    layers: int = 32
    page_size: int = 16

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def qkv(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim


LLAMA = Llama()


def paged_kv(cfg: Llama, batch: int, ctx: int, device="cuda", dtype=BF16):
    """A scattered paged cache holding ``ctx`` tokens for each of ``batch`` sequences."""
    pages_per_seq = math.ceil(ctx / cfg.page_size)
    pages = batch * pages_per_seq + 1
    shape = (pages, cfg.page_size, cfg.kv_heads, cfg.head_dim)
    kc = torch.randn(shape, device=device, dtype=dtype)
    vc = torch.randn(shape, device=device, dtype=dtype)
    table = torch.randperm(pages - 1, device=device)[: batch * pages_per_seq].view(batch, pages_per_seq).int()
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    return kc, vc, table, seq_lens


def attention_bytes(cfg: Llama, batch: int, ctx: int) -> int:
    """K and V read once, q read and the output written."""
    return 2 * batch * ctx * cfg.kv_heads * cfg.head_dim * 2 + 2 * batch * cfg.heads * cfg.head_dim * 2


def attention_flops(cfg: Llama, batch: int, ctx: int) -> int:
    return 4 * batch * cfg.heads * ctx * cfg.head_dim


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Stock decode attention: the G query heads of a KV head ride as G query rows (GQA
    without repeating K/V), over a contiguous ``[B, Hkv, L, D]`` cache of full rows."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    return F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), k, v).reshape(b, hq, d)


def flashinfer_decode(cfg: Llama, q, kc, vc, table, ctx: int):
    """FlashInfer's paged decode, planned as its users do (it sizes work for the whole GPU)."""
    import flashinfer

    b = q.shape[0]
    pages_per_seq = table.shape[1]
    indptr = torch.arange(0, b + 1, device="cuda", dtype=torch.int32) * pages_per_seq
    indices = table.reshape(-1).contiguous()
    last = torch.full((b,), ctx - (pages_per_seq - 1) * cfg.page_size, dtype=torch.int32, device="cuda")
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=indptr,
        paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last)
    wrapper.plan(indptr, indices, last, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.page_size,
                 q_data_type=q.dtype, kv_data_type=kc.dtype)
    return lambda: wrapper.run(q, (kc, vc))


def gemm_shapes(cfg: Llama) -> dict[str, tuple[int, int]]:
    """``{op: (n_out, k_in)}`` of the decode projections and the LM head."""
    return {"qkv": (cfg.qkv, cfg.hidden), "o": (cfg.hidden, cfg.heads * cfg.head_dim),
            "gate_up": (2 * cfg.inter, cfg.hidden), "down": (cfg.hidden, cfg.inter), "lm_head": (cfg.vocab, cfg.hidden)}


def rotated_weights(n: int, k: int, min_bytes: int = ROTATE_BYTES, cap: int = 8, device="cuda", dtype=BF16):
    """Enough copies of an ``[n, k]`` weight that cycling through them defeats the L2."""
    copies = max(1, min(cap, math.ceil(min_bytes / (n * k * 2))))
    return [torch.randn(n, k, device=device, dtype=dtype) / math.sqrt(k) for _ in range(copies)]


class DecodeLayer:
    """One Llama decoder layer at decode with its own weights and a paged KV cache of ``ctx``
    tokens per sequence, as graph-safe callables :meth:`stock` and :meth:`ours`."""

    def __init__(self, cfg: Llama, batch: int, ctx: int, device="cuda", dtype=BF16):
        self.cfg, self.b, self.ctx = cfg, batch, ctx

        def rnd(*shape):
            return torch.randn(*shape, device=device, dtype=dtype) / math.sqrt(shape[-1])
        self.w_qkv, self.w_o = rnd(cfg.qkv, cfg.hidden), rnd(cfg.hidden, cfg.heads * cfg.head_dim)
        self.w_gu, self.w_down = rnd(2 * cfg.inter, cfg.hidden), rnd(cfg.hidden, cfg.inter)
        self.w_in = torch.ones(cfg.hidden, device=device, dtype=dtype)
        self.w_post = torch.ones(cfg.hidden, device=device, dtype=dtype)
        self.x = torch.randn(batch, cfg.hidden, device=device, dtype=dtype)
        self.res = torch.randn(batch, cfg.hidden, device=device, dtype=dtype)
        self.kc, self.vc, self.table, self.seq_lens = paged_kv(cfg, batch, ctx, device, dtype)
        self.positions = (self.seq_lens - 1).long()
        last_page = self.table[torch.arange(batch, device=device), (ctx - 1) // cfg.page_size].long()
        self.slots = last_page * cfg.page_size + (ctx - 1) % cfg.page_size
        inv = 1.0 / (500000 ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim))
        f = torch.arange(ctx + 1, device=device).float()[:, None] * inv[None]
        self.cos_sin = torch.cat([f.cos(), f.sin()], -1)
        self.scale = cfg.head_dim**-0.5
        shape = (batch, cfg.kv_heads, ctx, cfg.head_dim)  # stock attention reads a contiguous copy
        self.k_contig = torch.randn(shape, device=device, dtype=dtype)
        self.v_contig = torch.randn(shape, device=device, dtype=dtype)

    def split_heads(self, qkv):
        c = self.cfg
        return qkv.view(self.b, -1, c.head_dim).split([c.heads, c.kv_heads, c.kv_heads], dim=1)

    def stock(self):
        c = self.cfg
        h, res = reference.fused_add_rms_norm(self.x, self.res, self.w_in, 1e-5)
        q, k, v = self.split_heads(F.linear(h, self.w_qkv))
        q = reference.apply_rotary(q, self.positions, self.cos_sin)
        k = reference.apply_rotary(k, self.positions, self.cos_sin)
        self.kc.view(-1, c.kv_heads, c.head_dim).index_copy_(0, self.slots, k)
        self.vc.view(-1, c.kv_heads, c.head_dim).index_copy_(0, self.slots, v)
        o = sdpa_decode(q, self.k_contig, self.v_contig)
        o = F.linear(o.reshape(self.b, -1), self.w_o)
        h, res = reference.fused_add_rms_norm(o, res, self.w_post, 1e-5)
        return F.linear(reference.silu_and_mul(F.linear(h, self.w_gu)), self.w_down)

    def ours(self, linear=F.linear):
        h, res = norm.fused_add_rms_norm(self.x, self.res, self.w_in, 1e-5)
        q, k, v = self.split_heads(linear(h, self.w_qkv))
        q, _ = rotary.rotary_and_store_kv(q, k, v, self.positions, self.cos_sin, self.kc, self.vc, self.slots)
        o = decode_attention.paged_decode_attention(q, self.kc, self.vc, self.table, self.seq_lens, self.scale)
        o = linear(o.reshape(self.b, -1), self.w_o)
        h, res = norm.fused_add_rms_norm(o, res, self.w_post, 1e-5)
        return linear(activation.silu_and_mul(linear(h, self.w_gu)), self.w_down)

    def step_bytes(self) -> int:
        """Bytes one layer must move at least: its weights and the K/V it reads."""
        c = self.cfg
        weights = (c.qkv * c.hidden + c.hidden * c.heads * c.head_dim + 3 * c.inter * c.hidden) * 2
        return weights + attention_bytes(c, self.b, self.ctx)

    def step_flops(self) -> int:
        c = self.cfg
        linear = 2 * self.b * (c.qkv * c.hidden + c.hidden * c.heads * c.head_dim + 3 * c.inter * c.hidden)
        return linear + attention_flops(c, self.b, self.ctx)


class KeepLast:
    """Holds the value of the latest key only (big GPU inputs shared by consecutive tests)."""

    def __init__(self):
        self.key = self.value = None

    def get(self, key, make):
        if key != self.key:
            self.clear()  # free the old value before making the new one
            self.value, self.key = make(), key
        return self.value

    def clear(self) -> None:
        self.key = self.value = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
