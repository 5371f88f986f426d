"""Rotary embedding (rotate-half) on q and k, plus the paged KV-cache write, in one kernel.

One program per token: cos/sin of its position are loaded once and used for every head of q
and k; k (rotated) and v go straight to their cache slot. A negative slot is padding: its q/k
are still rotated (cheap, keeps the outputs defined) but nothing is written to the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(src, s_stride_t, s_stride_h, dst, d_stride_t, d_stride_h, t, cos, sin, n_heads,
            BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    """Rotate all heads of token t from ``src`` into ``dst``; returns the rotated halves (fp32)."""
    h = tl.arange(0, BLOCK_H)
    i = tl.arange(0, HALF)
    ok = (h < n_heads)[:, None]
    s = src + t * s_stride_t + h[:, None] * s_stride_h + i[None, :]
    x1 = tl.load(s, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(s + HALF, mask=ok, other=0.0).to(tl.float32)
    y1 = x1 * cos[None, :] - x2 * sin[None, :]
    y2 = x2 * cos[None, :] + x1 * sin[None, :]
    o = dst + t * d_stride_t + h[:, None] * d_stride_h + i[None, :]
    tl.store(o, y1.to(dst.dtype.element_ty), mask=ok)
    tl.store(o + HALF, y2.to(dst.dtype.element_ty), mask=ok)
    return y1, y2


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, qo_ptr, ko_ptr, kc_ptr, vc_ptr, slot_ptr,
    n_q_heads, n_kv_heads,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sqo_t, sqo_h, sko_t, sko_h, s_cs,
    skc_p, skc_t, skc_h, svc_p, svc_t, svc_h,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, HALF: tl.constexpr,
    PAGE_SIZE: tl.constexpr, HAS_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF)
    cos = tl.load(cs_ptr + pos * s_cs + i)
    sin = tl.load(cs_ptr + pos * s_cs + HALF + i)
    _rotate(q_ptr, sq_t, sq_h, qo_ptr, sqo_t, sqo_h, t, cos, sin, n_q_heads, BLOCK_HQ, HALF)
    if HAS_K:
        k1, k2 = _rotate(k_ptr, sk_t, sk_h, ko_ptr, sko_t, sko_h, t, cos, sin, n_kv_heads, BLOCK_HKV, HALF)
        h = tl.arange(0, BLOCK_HKV)
        # The slot is loaded once per head (same address) because the interpreter mishandles
        # a scalar bool combined with a vector mask.
        slot = tl.load(slot_ptr + t + 0 * h).to(tl.int64)
        ok = ((h < n_kv_heads) & (slot >= 0))[:, None]
        page = (slot // PAGE_SIZE)[:, None]
        off = (slot % PAGE_SIZE)[:, None]
        kc = kc_ptr + page * skc_p + off * skc_t + h[:, None] * skc_h + i[None, :]
        tl.store(kc, k1.to(kc_ptr.dtype.element_ty), mask=ok)
        tl.store(kc + HALF, k2.to(kc_ptr.dtype.element_ty), mask=ok)
        vs = v_ptr + t * sv_t + h[:, None] * sv_h + i[None, :]
        vc = vc_ptr + page * svc_p + off * svc_t + h[:, None] * svc_h + i[None, :]
        tl.store(vc, tl.load(vs, mask=ok, other=0.0).to(vc_ptr.dtype.element_ty), mask=ok)
        tl.store(vc + HALF, tl.load(vs + HALF, mask=ok, other=0.0).to(vc_ptr.dtype.element_ty), mask=ok)


def _check_last(*ts):
    for t in ts:
        if t.stride(-1) != 1:
            raise ValueError("rotary tensors and caches must be contiguous in head_dim")


def rotary_and_store_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *, q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contract: :func:`reference.rotary_and_store_kv`."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if D % 2 or (D // 2) & (D // 2 - 1):
        raise ValueError(f"head_dim {D} must be twice a power of two")
    _check_last(q, k, v, cos_sin_cache, k_cache, v_cache)
    q_out = torch.empty_like(q) if q_out is None else q_out
    k_out = torch.empty_like(k) if k_out is None else k_out
    if T:
        _rope_kernel[(T,)](
            q, k, v, positions, cos_sin_cache, q_out, k_out, k_cache, v_cache, slot_mapping,
            Hq, Hkv,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0),
            *k_cache.stride()[:3], *v_cache.stride()[:3],
            BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_HKV=triton.next_power_of_2(Hkv), HALF=D // 2,
            PAGE_SIZE=k_cache.shape[1], HAS_K=True, num_warps=4,
        )
    return q_out, k_out


def apply_rotary(
    x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Contract: :func:`reference.apply_rotary`."""
    T, H, D = x.shape
    if D % 2 or (D // 2) & (D // 2 - 1):
        raise ValueError(f"head_dim {D} must be twice a power of two")
    _check_last(x, cos_sin_cache)
    out = torch.empty_like(x) if out is None else out
    if T:
        _rope_kernel[(T,)](  # the k/v/cache pointers are unused with HAS_K=False
            x, x, x, positions, cos_sin_cache, out, x, x, x, positions,
            H, 0,
            x.stride(0), x.stride(1), 0, 0, 0, 0, out.stride(0), out.stride(1), 0, 0, cos_sin_cache.stride(0),
            0, 0, 0, 0, 0, 0,
            BLOCK_HQ=triton.next_power_of_2(H), BLOCK_HKV=1, HALF=D // 2, PAGE_SIZE=1, HAS_K=False, num_warps=4,
        )
    return out
