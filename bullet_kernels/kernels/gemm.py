"""Skinny GEMM for decode, ``y = x @ W.T`` with few rows, split over K to fill the SM budget.

With M <= 64 rows there are only ``N / BLOCK_N`` output tiles (64 for N = 4096), fewer than the
SMs of a large partition, and each tile streams its slice of W once: the cost is the weight
bytes. Splitting K gives each SM a share of those bytes; the fp32 partials are summed by a
second small kernel (deterministic, unlike atomics). Whether this beats cuBLAS on a partition
is measured by bench/test_decode_partitions.py::test_gemm; the dispatcher routes ``linear`` by that result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_flags, mma
from .sizing import current_sm_budget, gemm_split_k


@triton.jit
def _splitk_kernel(
    x_ptr, w_ptr, y_ptr, ws_ptr, M, N, K, k_per_split,
    stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_row = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_row = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        if EVEN_K:  # no mask along K keeps the loads 16-byte vectors
            a = tl.load(x_row + kk[None, :], mask=(rm < M)[:, None], other=0.0)
            b = tl.load(w_row + kk[None, :], mask=(rn < N)[:, None], other=0.0)
        else:
            a = tl.load(x_row + kk[None, :], mask=(rm < M)[:, None] & (kk < k_hi)[None, :], other=0.0)
            b = tl.load(w_row + kk[None, :], mask=(rn < N)[:, None] & (kk < k_hi)[None, :], other=0.0)
        acc += mma(a, tl.trans(b), DOT_PREC, DOT_UPCAST)
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    if not SPLIT:
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        ws = ws_ptr + (pid_k * M + rm)[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(ws, acc, mask=ok)


@triton.jit
def _sum_splits_kernel(ws_ptr, y_ptr, MN, N, stride_ym, split_k, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < MN
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(split_k):
        acc += tl.load(ws_ptr + s * MN + idx, mask=ok, other=0.0)
    tl.store(y_ptr + (idx // N) * stride_ym + idx % N, acc.to(y_ptr.dtype.element_ty), mask=ok)


def config(M: int, N: int, K: int, sms: int | None = None) -> dict:
    """Tile sizes and split-K for this shape and SM budget (a heuristic; the bench checks it)."""
    sms = current_sm_budget() if sms is None else sms
    block_m = min(64, max(16, triton.next_power_of_2(M)))
    block_n = 64 if M <= 32 else 128
    block_k = 128 if M <= 32 else 64  # keeps 4 pipeline stages within shared memory
    split = gemm_split_k(triton.cdiv(M, block_m), triton.cdiv(N, block_n), K, block_k, sms)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split}


def linear(x: torch.Tensor, weight: torch.Tensor, *, cfg: dict | None = None) -> torch.Tensor:
    """``x @ weight.T`` (weight ``[N, K]``, no bias), the contract of ``F.linear(x, weight)``."""
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.shape[1] != K or weight.stride(1) != 1:
        raise ValueError(f"weight {tuple(weight.shape)} must be [N, {K}] with contiguous rows")
    x2 = x.reshape(-1, K)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*x.shape[:-1], N)
    c = dict(config(M, N, K)) if cfg is None else dict(cfg)
    split = c["SPLIT_K"]
    k_per_split = triton.cdiv(triton.cdiv(K, split), c["BLOCK_K"]) * c["BLOCK_K"]
    split = triton.cdiv(K, k_per_split)  # no empty splits
    ws = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else y
    grid = (triton.cdiv(N, c["BLOCK_N"]), triton.cdiv(M, c["BLOCK_M"]), split)
    _splitk_kernel[grid](
        x2, weight, y, ws, M, N, K, k_per_split, x2.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], SPLIT=split > 1,
        EVEN_K=K % c["BLOCK_K"] == 0,
        **dot_flags(x.dtype), num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 4),
    )
    if split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(M * N, block),)](ws, y, M * N, N, y.stride(0), split, BLOCK=block)
    return y.view(*x.shape[:-1], N)
