"""Kernels used by the model runner, dispatched by device.

Each public function here has the signature of its twin in :mod:`.reference` (the contract).
CUDA tensors go to our Triton kernels; everything else runs the reference. Two environment
overrides, read through :func:`bullet_kernels.config.kernel_settings`:

- ``BULLET_KERNELS=reference`` forces the reference everywhere (A/B comparisons);
- ``BULLET_LINEAR=cublas|triton|cublaslt-target`` picks the GEMM (default ``cublas``: on
  partitions cuBLAS already draws copy bandwidth; ``cublaslt-target``: cuBLASLt told the SM
  budget, :mod:`.blas_target`).

Launch sizes follow :func:`current_sm_budget`; wrap graph captures in :func:`sm_budget`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import kernel_settings
from . import reference
from .sizing import current_sm_budget, sm_budget

try:  # triton is a dependency, but the reference must work even where it fails to import
    from . import activation, blas_target, decode_attention, gemm, norm, prefill_attention, rotary

    _TRITON_ERROR = ""
except Exception as exc:  # pragma: no cover - depends on the install
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"


def _triton(*tensors: torch.Tensor) -> bool:
    """Our kernels run when every tensor is on CUDA and the reference is not forced."""
    if _TRITON_ERROR or kernel_settings().kernels == "reference":
        return False
    return all(t.is_cuda for t in tensors)


def rms_norm(x, weight, eps):
    if _triton(x, weight):
        return norm.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def fused_add_rms_norm(x, residual, weight, eps):
    if _triton(x, residual, weight):
        return norm.fused_add_rms_norm(x, residual, weight, eps)
    return reference.fused_add_rms_norm(x, residual, weight, eps)


def silu_and_mul(gate_up):
    if _triton(gate_up):
        return activation.silu_and_mul(gate_up)
    return reference.silu_and_mul(gate_up)


def apply_rotary(x, positions, cos_sin_cache):
    if _triton(x, positions, cos_sin_cache):
        return rotary.apply_rotary(x, positions, cos_sin_cache)
    return reference.apply_rotary(x, positions, cos_sin_cache)


def rotary_and_store_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping):
    args = (q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    if _triton(*args):
        return rotary.rotary_and_store_kv(*args)
    return reference.rotary_and_store_kv(*args)


def paged_decode_attention(q, k_cache, v_cache, page_table, seq_lens, scale):
    args = (q, k_cache, v_cache, page_table, seq_lens)
    if _triton(*args):
        return decode_attention.paged_decode_attention(*args, scale)
    return reference.paged_decode_attention(*args, scale)


def paged_prefill_attention(q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens, scale):
    args = (q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens)
    if _triton(*args):
        return prefill_attention.paged_prefill_attention(*args, scale)
    return reference.paged_prefill_attention(*args, scale)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias), routed to cuBLAS, cuBLASLt with the SM budget as its
    SM-count target, or our split-K GEMM."""
    mode = kernel_settings().linear
    if mode == "triton" and _triton(x, weight):
        return gemm.linear(x, weight)
    if mode == "cublaslt-target" and _triton(x, weight):
        with blas_target.cublaslt_sm_target(current_sm_budget()):
            return F.linear(x, weight)
    return F.linear(x, weight)


for _name in ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "apply_rotary", "rotary_and_store_kv",
              "paged_decode_attention", "paged_prefill_attention"):
    globals()[_name].__doc__ = getattr(reference, _name).__doc__

__all__ = [
    "reference",
    "current_sm_budget",
    "sm_budget",
    "apply_rotary",
    "fused_add_rms_norm",
    "linear",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "rotary_and_store_kv",
    "silu_and_mul",
]
