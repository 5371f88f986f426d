"""Paged prefill attention: ragged causal batch over a paged cache with a cached prefix.

Graph-safe without any host-side metadata: the grid is ``(cdiv(T, BLOCK_Q) + B, Hkv)``, fixed
by the token bucket T and batch size B. Request b owns tile slots starting at
``cu_seqlens_q[b] // BLOCK_Q + b`` (an upper bound on the tiles before it, so ranges never
overlap); a program finds its request by a binary search over ``cu_seqlens_q`` in registers
and exits when its slot is past the request's length. The last "request" (index B) is the
padding after ``cu_seqlens_q[-1]``: those programs write zeros.

Like decode, one program holds all query heads of one KV head: its rows are
``BLOCK_Q tokens x G_PAD heads``, so each K/V tile feeds the whole group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import decode_attention
from .common import dot_flags, mma

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, pt_ptr, cu_ptr, lens_ptr, out_ptr,
    qk_scale, num_tokens, num_reqs,
    stride_qt, stride_qh,
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    stride_pt, stride_ot, stride_oh,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
    SKIP_SINGLE: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)

    # Largest r in [0, num_reqs] whose first tile slot cu[r] // BLOCK_Q + r is <= pid.
    lo = pid * 0
    hi = lo + num_reqs
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        ok = tl.load(cu_ptr + mid) // BLOCK_Q + mid <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    r = lo
    real = r < num_reqs
    q_start = tl.load(cu_ptr + r)
    q_end = tl.where(real, tl.load(cu_ptr + r + 1, mask=real, other=0), num_tokens)
    seq_len = tl.where(real, tl.load(lens_ptr + r, mask=real, other=0), 0)
    if SKIP_SINGLE:  # one-token sequences are the decode kernel's: this program neither reads nor writes
        real = real & (q_end - q_start != 1)
        q_end = tl.where(real | (r == num_reqs), q_end, q_start)
    row0 = q_start + (pid - q_start // BLOCK_Q - r) * BLOCK_Q

    rows = tl.arange(0, BLOCK_Q * G_PAD)
    tok = row0 + rows // G_PAD
    hh = rows % G_PAD
    head = kvh * GROUP + hh
    row_ok = (tok < q_end) & (hh < GROUP)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + tok.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)

    # Token tok sits at absolute position prefix + (tok - q_start); it sees kv positions <= that.
    prefix = seq_len - (q_end - q_start)
    pos = prefix + tok - q_start
    kv_hi = tl.where(real & (row0 < q_end), prefix + tl.minimum(row0 + BLOCK_Q, q_end) - q_start, 0)

    m = tl.full([BLOCK_Q * G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * G_PAD, HEAD_DIM], tl.float32)
    pt_row = pt_ptr + r.to(tl.int64) * stride_pt
    for start in range(0, kv_hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        t_ok = t < kv_hi
        page = tl.load(pt_row + t // PAGE_SIZE, mask=t_ok, other=0).to(tl.int64)
        off = t % PAGE_SIZE
        k = tl.load(k_ptr + (page * stride_kp + off * stride_kt + kvh * stride_kh)[:, None] + d[None, :],
                    mask=t_ok[:, None], other=0.0)
        s = mma(q, tl.trans(k), DOT_PREC, DOT_UPCAST) * qk_scale
        s = tl.where(t_ok[None, :] & (t[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + (page * stride_vp + off * stride_vt + kvh * stride_vh)[:, None] + d[None, :],
                    mask=t_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PREC, DOT_UPCAST)
        m = m_new

    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    dst = out_ptr + tok.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=((tok < q_end) & (hh < GROUP))[:, None])


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int = 64,
    single_rows_by_decode_kernel: bool = True,
) -> torch.Tensor:
    """Contract: :func:`reference.paged_prefill_attention`.

    ``block_m`` (rows per program = tokens x padded group) defaults to 128 on GPU.

    ``single_rows_by_decode_kernel``: sequences with exactly one new token (the decode rows of
    a chunked-prefill step) go to the split-KV decode kernel, the rest to the prefill kernel;
    the two write disjoint rows. Here a one-token sequence would fill one row of a 128-row
    tile and read its whole context on one program per KV head: in a fused step of a
    432-token chunk and 80 decode rows on the H200 that made the step as slow as a prefill
    and a decode step run one after the other (24 ms against 13.9 + 9.3 ms, docs/serving.md).
    """
    T, Hq, D = q.shape
    _, page_size, Hkv, _ = k_cache.shape
    B = page_table.shape[0]
    if Hq % Hkv or D & (D - 1) or D < 16 or page_size & (page_size - 1):
        raise ValueError(f"unsupported shapes: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    if cu_seqlens_q.shape[0] != B + 1 or seq_lens.shape[0] < B:
        raise ValueError(f"cu_seqlens_q needs B+1={B + 1} entries and seq_lens B; got "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(seq_lens.shape)}")
    q = q if q.stride(2) == 1 else q.contiguous()
    out = torch.empty_like(q) if out is None else out
    if T == 0:
        return out
    group = Hq // Hkv
    g_pad = triton.next_power_of_2(group)
    block_q = max((block_m or 128) // g_pad, triton.cdiv(16, g_pad))  # tl.dot needs >= 16 rows
    if single_rows_by_decode_kernel:
        decode_attention.paged_decode_attention(q, k_cache, v_cache, page_table, seq_lens, scale, out=out,
                                                cu_seqlens_q=cu_seqlens_q)
    grid = (triton.cdiv(T, block_q) + B, Hkv)
    _prefill_kernel[grid](
        q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens, out,
        scale * LOG2E, T, B,
        q.stride(0), q.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        page_table.stride(0), out.stride(0), out.stride(1),
        GROUP=group, G_PAD=g_pad, BLOCK_Q=block_q, HEAD_DIM=D, PAGE_SIZE=page_size,
        BLOCK_N=block_n, SEARCH_STEPS=max(1, B.bit_length()), **dot_flags(k_cache.dtype),
        SKIP_SINGLE=single_rows_by_decode_kernel,
        num_warps=8 if block_q * g_pad >= 128 else 4, num_stages=2,
    )
    return out
