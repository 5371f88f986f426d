"""Kernels used by the model runner, dispatched by device.

Each public function here has the signature of its twin in :mod:`.reference` (the contract).
CUDA tensors go to our Triton kernels where one exists; everything else runs the reference.
"""

from __future__ import annotations

from . import reference
from .reference import (  # noqa: F401  (re-exported until the Triton versions land)
    apply_rotary,
    fused_add_rms_norm,
    paged_decode_attention,
    paged_prefill_attention,
    rms_norm,
    rotary_and_store_kv,
    silu_and_mul,
)

__all__ = [
    "reference",
    "apply_rotary",
    "fused_add_rms_norm",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "rotary_and_store_kv",
    "silu_and_mul",
]
