"""Small pieces shared by the Triton kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter (TRITON_INTERPRET=1, used by the CPU tests) returns garbage from
# tl.dot on bf16 operands (triton 3.9); fp16 and fp32 are fine. Under the interpreter only,
# bf16 dots upcast their (already bf16-rounded) operands to fp32, which is what the tensor
# cores compute anyway: products of bf16 values accumulated in fp32.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexpr flags for :func:`mma`: exact fp32 (no TF32) and the interpreter workaround."""
    return {
        "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32",
        "DOT_UPCAST": INTERPRET and dtype == torch.bfloat16,
    }


@triton.jit
def mma(a, b, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr):
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)
