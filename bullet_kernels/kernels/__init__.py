"""Kernels used by the model runner, dispatched by device.

Each public function here has the signature of its twin in :mod:`.reference` (the contract).
CUDA tensors go to our Triton kernels; everything else runs the reference. Two environment
overrides, read through :func:`bullet_kernels.config.kernel_settings`:

- ``BULLET_KERNELS=reference`` forces the reference everywhere (A/B comparisons);
- ``BULLET_LINEAR`` picks the GEMM per phase: ``cublas``, ``triton`` (our split-K GEMM) or
  ``cublaslt-target`` (cuBLASLt told the SM budget, :mod:`.blas_target`); by default decode
  steps use ``cublaslt-target`` and prefill ``cublas`` (measured, see ``config.DEFAULT_LINEAR``).

The phase is the one of the innermost :func:`gemm_phase` scope (the model sets it around its
decoder layers from ``ForwardBatch.is_decode``; outside any scope, e.g. the LM head after the
layers: prefill's GEMM, the choice the shipped profile was measured with). Launch sizes follow
:func:`current_sm_budget`; wrap graph captures in :func:`sm_budget`. :func:`gemms_through`
hands every GEMM to a runner (kernel-level placement: the engine runs GEMMs on another lane
than the rest of a graph).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

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


_GEMM_PHASE: contextvars.ContextVar[str] = contextvars.ContextVar("bullet_gemm_phase", default="prefill")
_GEMM_RUNNER: contextvars.ContextVar[Callable[[Callable[[], Any]], Any] | None] = contextvars.ContextVar(
    "bullet_gemm_runner", default=None)


@contextlib.contextmanager
def gemm_phase(phase: str) -> Iterator[None]:
    """GEMMs inside are ``phase``'s (``decode`` or ``prefill``): :func:`linear` uses that phase's
    GEMM from ``BULLET_LINEAR``."""
    kernel_settings().linear(phase)  # refuses an unknown phase here, not at the first GEMM
    token = _GEMM_PHASE.set(phase)
    try:
        yield
    finally:
        _GEMM_PHASE.reset(token)


@contextlib.contextmanager
def gemms_through(runner: Callable[[Callable[[], Any]], Any] | None) -> Iterator[None]:
    """Every :func:`linear` inside runs as ``runner(gemm)``, ``gemm`` a no-argument function
    that computes it (None: run directly). The runner decides where (which stream and SM
    budget); it must return what ``gemm()`` returned."""
    token = _GEMM_RUNNER.set(runner)
    try:
        yield
    finally:
        _GEMM_RUNNER.reset(token)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias), routed to cuBLAS, cuBLASLt with the SM budget as its
    SM-count target, or our split-K GEMM, as ``BULLET_LINEAR`` says for the current phase."""
    runner = _GEMM_RUNNER.get()
    if runner is not None:
        return runner(lambda: _linear(x, weight))
    return _linear(x, weight)


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    mode = kernel_settings().linear(_GEMM_PHASE.get())
    if mode == "triton" and _triton(x, weight):
        return gemm.linear(x, weight)
    if mode == "cublaslt-target" and _triton(x, weight):
        with blas_target.cublaslt_sm_target(current_sm_budget()):  # read when the GEMM runs: a runner's budget
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
    "gemm_phase",
    "gemms_through",
    "linear",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "rotary_and_store_kv",
    "silu_and_mul",
]
