"""SiLU-and-mul for the gated MLP: ``silu(gate) * up`` from ``cat([gate, up], -1)``, one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    g = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n + cols, mask=ok, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(gate_up: torch.Tensor, *, out: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    """Contract: :func:`reference.silu_and_mul`."""
    n = gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, 2 * n)
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype, device=gate_up.device) if out is None else out
    o = out.view(-1, n)
    if x.shape[0] and n:
        _silu_and_mul_kernel[(x.shape[0], triton.cdiv(n, block))](
            x, o, n, x.stride(0), o.stride(0), BLOCK=block, num_warps=4
        )
    return out
