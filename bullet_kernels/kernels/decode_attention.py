"""Paged decode attention, split-KV (flash-decoding), sized for the SM budget.

Grid ``(batch, kv_heads, splits)``. One program (one warp by default) owns one KV-head group:
all ``Hq/Hkv`` query heads ride in the rows of one ``tl.dot``, so each K/V tile is read from
HBM once per group.
Each sequence is cut into ``splits`` equal chunks of *its own* length (read on device), so
short and long rows cost the same number of programs and the grid depends only on shapes and
the budget: graph-safe. With more than one split the partial outputs are merged by their
log-sum-exp, either by a second tiny kernel (``merge="separate"``) or, in the same launch, by
the program of each KV-head group that finishes last (``merge="fused"``: no merge kernel, its
launch and ramp gone where the work is short; the arrival counters it needs are zeroed by a small
fill kernel before, unless the caller keeps them). The split count is a runtime argument, so every
batch bucket and SM budget shares one compiled kernel (only "split or not" and the merge mode
are compiled in).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import DECODE_MERGES, DEFAULT_DECODE_MERGE, kernel_settings
from .common import INTERPRET, dot_flags, mma
from .sizing import decode_kv_splits

LOG2E = 1.4426950408889634
# K/V offsets are int32 (fewer address instructions) unless a cache view could overflow them.
OFFS64_FROM = 2**31 - 1


@triton.jit
def _load_page_ids(ptrs, ASM: tl.constexpr):
    """Page ids at ``ptrs``, loaded where Triton's software pipeliner cannot see them.

    A ``tl.load`` here joins the cp.async pipeline, and because the K/V addresses depend on
    it the pipeliner then waits for *every* copy in flight at the top of each iteration
    (``async_wait num=0``): one tile in flight per program, ~55-60% of a copy on 16-40 SMs
    (H100/H200, tune-decode-attention-*-20261126.json). An opaque inline-asm load keeps the
    page ids out of the async groups, so ``num_stages - 1`` tiles stay in flight. The
    interpreter (CPU tests) cannot run PTX and takes the plain load.
    """
    if ASM:
        return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [ptrs], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        return tl.load(ptrs)


@triton.jit
def _tile_kv(k_ptr, v_ptr, pt_row, start, hi, kvh, d, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
             PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, OFFS64: tl.constexpr,
             PAGE_ASM: tl.constexpr):
    """K and V rows (``[BLOCK_N, HEAD_DIM]``) of the tokens ``start + i``.

    Where a page holds whole tiles (``PAGE_SIZE % BLOCK_N == 0``) the tile is one strided
    block: one page-id load, then a scalar base plus loop-invariant offsets. Smaller pages
    need a page id per token. Unmasked tiles (all tokens < hi) skip the predicates.
    """
    rows = tl.arange(0, BLOCK_N)
    t = start + rows
    if PAGE_SIZE % BLOCK_N == 0:
        page = _load_page_ids(pt_row + start // PAGE_SIZE, PAGE_ASM)
        page = page.to(tl.int64) if OFFS64 else page
        slot = start % PAGE_SIZE + rows
        k_rows = page * stride_kp + slot * stride_kt + kvh * stride_kh
        v_rows = page * stride_vp + slot * stride_vt + kvh * stride_vh
    else:
        page = _load_page_ids(pt_row + tl.minimum(t, hi - 1) // PAGE_SIZE, PAGE_ASM)  # clamped: no mask
        page = page.to(tl.int64) if OFFS64 else page
        off = t % PAGE_SIZE
        k_rows = page * stride_kp + off * stride_kt + kvh * stride_kh
        v_rows = page * stride_vp + off * stride_vt + kvh * stride_vh
    if MASKED:
        ok = (t < hi)[:, None]
        k = tl.load(k_ptr + k_rows[:, None] + d[None, :], mask=ok, other=0.0)
        v = tl.load(v_ptr + v_rows[:, None] + d[None, :], mask=ok, other=0.0)
    else:
        k = tl.load(k_ptr + k_rows[:, None] + d[None, :])
        v = tl.load(v_ptr + v_rows[:, None] + d[None, :])
    return k, v


@triton.jit
def _attend_tile(q, k, v, m, l, acc, start, hi, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """One online-softmax step over a K/V tile; returns the new (m, l, acc)."""
    s = mma(q, tl.trans(k), DOT_PREC, DOT_UPCAST) * qk_scale
    if MASKED:
        s = tl.where((start + tl.arange(0, BLOCK_N) < hi)[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PREC, DOT_UPCAST)
    return m_new, l, acc


@triton.jit
def _decode_row(b, lens_ptr, cu_ptr, ROWS_FROM_CU: tl.constexpr):
    """Sequence ``b``'s query/output row, whether this kernel owns it (1 or 0, an integer:
    it scales store bounds, where a scalar boolean mask trips Triton's interpreter), and its
    KV length.

    Decode batches: row ``b``, always. Ragged (prefill-path) batches: row ``cu[b]``, owned only
    when the sequence has exactly one new token (its other rows belong to the prefill kernel,
    which must be the only one to write them); an unowned sequence reads no KV.
    """
    if ROWS_FROM_CU:
        row = tl.load(cu_ptr + b)
        mine = tl.where(tl.load(cu_ptr + b + 1) - row == 1, 1, 0)
        seq_len = tl.load(lens_ptr + b) * mine
    else:
        row = b
        mine = 1
        seq_len = tl.load(lens_ptr + b)
    return row, mine, seq_len


@triton.jit
def _merge_group_if_last(part_ptr, lse_ptr, cnt_ptr, out_ptr, row, mine, part0, head0, num_splits,
                         stride_ob, stride_oh, GROUP: tl.constexpr, G_PAD: tl.constexpr, SPLITS_AT_ONCE: tl.constexpr,
                         HEAD_DIM: tl.constexpr):
    """Count this split in at ``cnt_ptr`` (its KV-head group's counter); the program that counts
    in last merges the group's partials (``GROUP`` query heads from partial row ``part0``) into
    ``out`` row ``row``, as :func:`_decode_merge_kernel` would, and zeroes the counter again.

    Ordering (PTX memory model; the pattern of CUTLASS's split-K semaphore): every thread's
    partial stores come before the CTA barrier, and the counter's release (Triton lets one
    thread do a scalar atomic) is cumulative over what that barrier ordered before it, so all
    of them are visible at GPU scope before the increment is. The last program's acquire on the
    same counter then orders its reads after every other program's stores; the barrier after it
    carries that to the threads that did not do the atomic (Triton broadcasts a scalar atomic's
    result with its own barrier or shuffle; ours does not rely on it). No program waits for
    another, so nothing needs the group's programs to be resident at once.

    Triton's interpreter (CPU tests) runs all of it: programs one after another, the atomic on
    host memory, the barrier as a no-op, the cache modifier ignored; no INTERPRET guard.
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == num_splits - 1:  # uniform over the program: every thread takes this branch or none
        tl.debug_barrier()
        h = tl.arange(0, G_PAD)
        d = tl.arange(0, HEAD_DIM)
        j = tl.arange(0, SPLITS_AT_ONCE)
        h_ok = h < GROUP
        rows = part0 + h * num_splits  # partial row of (head, split 0)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        den = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, HEAD_DIM], tl.float32)
        # Online log-sum-exp (base 2) over the splits, SPLITS_AT_ONCE of them per load: one
        # round trip to L2 per step, in a tile no larger than the attention's [BLOCK_H, D].
        for s0 in range(0, num_splits, SPLITS_AT_ONCE):
            at = rows[None, :] + (s0 + j)[:, None]  # [splits, heads]
            ok = ((s0 + j) < num_splits)[:, None] & h_ok[None, :]
            # The acquire already orders these loads (PTX calls cache operators hints). ".cg"
            # also keeps them out of this SM's L1, which is not coherent with the other SMs'
            # stores and may hold these addresses from an earlier launch (a graph's memory pool
            # hands every layer the same partial buffers): a stale line cannot be read even if
            # an acquire ever failed to invalidate L1.
            lse = tl.load(lse_ptr + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
            o = tl.load(part_ptr + at[:, :, None] * HEAD_DIM + d[None, None, :], mask=ok[:, :, None], other=0.0,
                        cache_modifier=".cg")
            m_new = tl.maximum(m, tl.max(lse, 0))
            ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing yet: every weight is 0, not NaN
            alpha = tl.exp2(m - ref)
            w = tl.exp2(lse - ref[None, :])  # an empty split (lse -inf) and a split past the end weigh 0
            den = den * alpha + tl.sum(w, 0)
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 0)
            m = m_new
        res = acc / tl.where(den > 0, den, 1.0)[:, None]  # all splits empty (padding rows): 0
        dst = out_ptr + row * stride_ob + (head0 + h)[:, None] * stride_oh + d[None, :]
        tl.store(dst, res.to(out_ptr.dtype.element_ty), mask=(h < GROUP * mine)[:, None])
        tl.store(cnt_ptr, 0)  # every split has counted in: a reused counter buffer is zero again


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, pt_ptr, lens_ptr, cu_ptr, out_ptr, part_ptr, lse_ptr, cnt_ptr,
    qk_scale, num_splits,  # qk_scale = softmax scale * log2(e): we work in base 2
    stride_qb, stride_qh,
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    stride_pt, stride_ob, stride_oh,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, OFFS64: tl.constexpr,
    PAGE_ASM: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr, ROWS_FROM_CU: tl.constexpr,
    FUSED_MERGE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * GROUP

    row, mine, seq_len = _decode_row(b, lens_ptr, cu_ptr, ROWS_FROM_CU)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq_len)
    # Whole tiles run unmasked; only the last (partial) tile of a split pays for predicates.
    full_hi = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N

    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    head = kvh * GROUP + h
    h_ok = h < GROUP
    # Not owned: no read either (a padding sequence's row cu[b] can be one past the last row of q).
    q = tl.load(q_ptr + row * stride_qb + head[:, None] * stride_qh + d[None, :], mask=(h < GROUP * mine)[:, None],
                other=0.0)
    q = q.to(k_ptr.dtype.element_ty)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    pt_row = pt_ptr + b.to(tl.int64) * stride_pt
    for start in range(lo, full_hi, BLOCK_N):
        k, v = _tile_kv(k_ptr, v_ptr, pt_row, start, hi, kvh, d, stride_kp, stride_kt, stride_kh,
                        stride_vp, stride_vt, stride_vh, PAGE_SIZE, BLOCK_N, False, OFFS64, PAGE_ASM)
        m, l, acc = _attend_tile(q, k, v, m, l, acc, start, hi, qk_scale, BLOCK_N, False, DOT_PREC, DOT_UPCAST)
    if full_hi < hi:
        k, v = _tile_kv(k_ptr, v_ptr, pt_row, full_hi, hi, kvh, d, stride_kp, stride_kt, stride_kh,
                        stride_vp, stride_vt, stride_vh, PAGE_SIZE, BLOCK_N, True, OFFS64, PAGE_ASM)
        m, l, acc = _attend_tile(q, k, v, m, l, acc, full_hi, hi, qk_scale, BLOCK_N, True, DOT_PREC, DOT_UPCAST)

    has = l > 0  # false for an empty split and for padding rows (seq_len 0)
    o = acc / tl.where(has, l, 1.0)[:, None]
    if not SPLIT:
        dst = out_ptr + row * stride_ob + head[:, None] * stride_oh + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=(h < GROUP * mine)[:, None])
    else:
        part = (b * num_q_heads + head) * num_splits + split  # partials are [B, Hq, splits, (D)]
        tl.store(part_ptr + part[:, None] * HEAD_DIM + d[None, :], o, mask=h_ok[:, None])
        tl.store(lse_ptr + part, tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf")), mask=h_ok)
        if FUSED_MERGE:
            _merge_group_if_last(part_ptr, lse_ptr, cnt_ptr + b * tl.num_programs(1) + kvh, out_ptr, row, mine,
                                 (b * num_q_heads + kvh * GROUP) * num_splits, kvh * GROUP, num_splits,
                                 stride_ob, stride_oh, GROUP, G_PAD, BLOCK_H // G_PAD, HEAD_DIM)


@triton.jit
def _decode_merge_kernel(
    part_ptr, lse_ptr, lens_ptr, cu_ptr, out_ptr, num_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr, ROWS_FROM_CU: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    out_row, mine, _ = _decode_row(b, lens_ptr, cu_ptr, ROWS_FROM_CU)
    row = b * tl.num_programs(1) + h
    s = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(lse_ptr + row * num_splits + s, mask=s < num_splits, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # all splits empty: every weight is 0
    w = tl.exp2(lse - mx)
    o = tl.load(part_ptr + (row * num_splits + s)[:, None] * HEAD_DIM + d[None, :],
                mask=(s < num_splits)[:, None], other=0.0)
    den = tl.sum(w, 0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + out_row * stride_ob + h * stride_oh + d, res.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM * mine)


def _extent(t: torch.Tensor) -> int:
    """One past the largest element offset a view can address (its numel when contiguous)."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)


def _check(q, k_cache, v_cache, page_table, seq_lens, cu_seqlens_q=None):
    B, Hq, D = q.shape
    if cu_seqlens_q is not None:  # ragged rows: one sequence per page-table row
        B = page_table.shape[0]
        if cu_seqlens_q.shape[0] != B + 1:
            raise ValueError(f"cu_seqlens_q needs {B + 1} entries (page-table rows + 1), got {cu_seqlens_q.shape[0]}")
    _, page_size, Hkv, Dk = k_cache.shape
    if Dk != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} and caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} disagree")
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    if D & (D - 1) or D < 16 or page_size & (page_size - 1):
        raise ValueError(f"head_dim ({D}) must be a power of two >= 16 and page_size ({page_size}) a power of two")
    if page_table.shape[0] < B or seq_lens.shape[0] < B:
        raise ValueError("page_table and seq_lens need one row per query")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or page_table.stride(1) != 1:
        raise ValueError("caches and page_table must be contiguous in their last dim")
    return B, Hq, D, page_size, Hkv


def check_merge(merge: str | None) -> str:
    """The merge mode to use: ``merge``, or for None the configured one (``BULLET_DECODE_MERGE``,
    default ``config.DEFAULT_DECODE_MERGE``, where the choice and its reason live), so one
    setting flips every caller, the prefill kernel's decode rows included."""
    merge = kernel_settings().decode_merge if merge is None else merge
    if merge not in DECODE_MERGES:
        raise ValueError(f"merge must be one of {', '.join(DECODE_MERGES)} (or None for the default, "
                         f"{DEFAULT_DECODE_MERGE}), got {merge!r}")
    return merge


def _merge_counters(counters: torch.Tensor | None, groups: int, device: torch.device) -> torch.Tensor:
    """One arrival counter per (sequence, KV head), zero on entry.

    Fresh by default: the decode lane and the prefill lane's ragged path run this kernel at the
    same time, and a buffer kept by this module would be shared by their launches. Inside a CUDA
    graph capture the zeros come from the graph's private pool and their fill is a node of the
    graph (a small fill kernel: torch zeroes CUDA memory with a kernel, not a memset).
    """
    if counters is None:
        return torch.zeros(groups, dtype=torch.int32, device=device)
    if counters.dtype != torch.int32 or counters.device != device or not counters.is_contiguous() \
            or counters.numel() < groups:
        raise ValueError(f"merge_counters must be a contiguous int32 tensor on {device} with at least "
                         f"{groups} (sequences x KV heads) elements, got {counters.dtype} {tuple(counters.shape)} "
                         f"on {counters.device}")
    return counters


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int = 32,
    num_warps: int = 1,
    num_stages: int = 3,
    maxnreg: int | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    merge: str | None = None,
    merge_counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """Contract: :func:`reference.paged_decode_attention`. ``num_splits`` overrides the sizing.

    With ``cu_seqlens_q`` (``[B + 1]``, B = page-table rows), q and ``out`` are a ragged
    prefill-path batch: sequence b's query row is ``cu_seqlens_q[b]``, and only the sequences
    with exactly one new token are attended and written; the other rows of ``out`` are left
    as they are (:func:`.prefill_attention.paged_prefill_attention` writes them).

    ``merge`` (one of ``config.DECODE_MERGES``; None: ``BULLET_DECODE_MERGE``, default
    ``config.DEFAULT_DECODE_MERGE``) says how more than one
    split is merged: ``"separate"``, a second kernel; ``"fused"``, the last program of each
    KV-head group to finish, in the same launch. With one split there is nothing to merge and
    both are the same launch. ``merge_counters`` (fused only): the caller's int32 buffer of at
    least B x KV-heads zeros for the arrival counters, left zeroed again, instead of fresh
    zeros each call (which cost a fill kernel); it must never be shared by launches that can
    run at the same time (two lanes, two streams).

    Launch defaults from the tuning sweep (in git history, bench/tune_decode_attention.py) on the H100 (Triton 3.6; 16-132 SMs,
    b128 x 4k and b16 x 32k contexts; tune-decode-attention-h100-20261126.json): one warp
    per program, 32-token tiles, 3 stages. A 16-row dot leaves little for more warps to
    share, and with one warp there are no cross-warp softmax reductions (no block barriers)
    and ~6 programs fit on an SM, each with 2 tiles in flight: 85-97% of a partition-sized
    copy on 16-40 SMs, against 65-85% for 4-warp programs with 64-token tiles.
    """
    merge = check_merge(merge)
    if merge_counters is not None and merge != "fused":
        raise ValueError(f"merge_counters is for merge='fused' (the arrival counters), got merge={merge!r}")
    B, Hq, D, page_size, Hkv = _check(q, k_cache, v_cache, page_table, seq_lens, cu_seqlens_q)
    q = q if q.stride(2) == 1 else q.contiguous()
    out = torch.empty_like(q) if out is None else out
    if B == 0:
        return out
    group = Hq // Hkv
    max_ctx = page_table.shape[1] * page_size
    splits = num_splits or decode_kv_splits(B, Hkv, group, max_ctx)
    fused = splits > 1 and merge == "fused"
    if splits > 1:
        part = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
    else:
        part = lse = out  # unused
    counters = _merge_counters(merge_counters, B * Hkv, q.device) if fused else lse  # unused unless fused
    _decode_split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, page_table, seq_lens, seq_lens if cu_seqlens_q is None else cu_seqlens_q,
        out, part, lse, counters, scale * LOG2E, splits,
        q.stride(0), q.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        page_table.stride(0), out.stride(0), out.stride(1),
        GROUP=group, G_PAD=triton.next_power_of_2(group), BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=D,
        PAGE_SIZE=page_size, BLOCK_N=block_n, SPLIT=splits > 1,
        OFFS64=max(_extent(k_cache), _extent(v_cache)) >= OFFS64_FROM, PAGE_ASM=not INTERPRET,
        **dot_flags(k_cache.dtype), ROWS_FROM_CU=cu_seqlens_q is not None, FUSED_MERGE=fused,
        num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    if splits > 1 and not fused:
        _decode_merge_kernel[(B, Hq)](
            part, lse, seq_lens, seq_lens if cu_seqlens_q is None else cu_seqlens_q, out, splits,
            out.stride(0), out.stride(1), HEAD_DIM=D, SPLITS_P2=triton.next_power_of_2(splits),
            ROWS_FROM_CU=cu_seqlens_q is not None, num_warps=4,
        )
    return out
