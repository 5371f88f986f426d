"""Reference implementations (plain torch) of every op the model runner needs.

These define the contract for the Triton kernels in this package: same arguments, same
outputs, same layouts. They run on any device, are used on CPU, and are the ground truth
in the kernel tests. They favour clarity over speed and are not graph-capturable on GPU
(some loop over requests on the host).

Layouts shared by all attention ops:
- KV cache of one layer: ``k_cache``/``v_cache`` of shape ``[num_pages, page_size, num_kv_heads, head_dim]``.
- ``page_table``: ``[batch, max_pages_per_seq]`` int32, page ids of each sequence in order.
- ``seq_lens``: ``[batch]`` int32, number of valid KV tokens of each sequence *including* the
  tokens of the current step (their K/V are written before attention runs).
  A row with ``seq_lens == 0`` is padding: its output is zeros.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32, returned in ``x.dtype``."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = x + residual``; returns ``(rms_norm(residual), residual)``.

    The sum is rounded to ``x.dtype`` before the norm, as a bf16 model stores it.
    """
    summed = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(summed, weight, eps), summed


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up = cat([gate, up], -1)``."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)


def apply_rotary(
    x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> torch.Tensor:
    """Rotate-half (NeoX/Llama) rotary embedding.

    x: ``[tokens, heads, head_dim]``; positions: ``[tokens]`` int; cos_sin_cache:
    ``[max_pos, head_dim]`` fp32 holding ``cat([cos, sin], -1)`` of the ``head_dim // 2`` frequencies.
    """
    half = x.shape[-1] // 2
    cs = cos_sin_cache[positions.long()]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rotary_and_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary to q and k, write k (rotated) and v into the paged cache.

    q: ``[T, Hq, D]``, k/v: ``[T, Hkv, D]``; slot_mapping: ``[T]`` int, flat slot
    ``page * page_size + offset`` of each token; a negative slot means padding (not written).
    Returns ``(q_rotated, k_rotated)``.
    """
    q_rot = apply_rotary(q, positions, cos_sin_cache)
    k_rot = apply_rotary(k, positions, cos_sin_cache)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k_rot[valid].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[valid].to(v_cache.dtype)
    return q_rot, k_rot


def gather_kv(
    cache: torch.Tensor, page_table_row: torch.Tensor, length: int
) -> torch.Tensor:
    """The first ``length`` tokens of one sequence: ``[length, Hkv, D]``."""
    page_size = cache.shape[1]
    n_pages = (length + page_size - 1) // page_size
    pages = cache[page_table_row[:n_pages].long()]
    return pages.reshape(-1, *cache.shape[2:])[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_pos: torch.Tensor):
    """q: [Lq, Hq, D], k/v: [Lk, Hkv, D]; causal by absolute positions q_pos (kv pos = index)."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    kv_pos = torch.arange(k.shape[0], device=q.device)
    mask = kv_pos[None, :] > q_pos[:, None]
    scores = scores.masked_fill(mask[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vf)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence. q: ``[B, Hq, D]`` -> ``[B, Hq, D]`` in ``q.dtype``."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        if n == 0:
            continue
        k = gather_kv(k_cache, page_table[b], n)
        v = gather_kv(v_cache, page_table[b], n)
        pos = torch.tensor([n - 1], device=q.device)
        out[b] = _attend(q[b : b + 1], k, v, scale, pos)[0].to(q.dtype)
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention for a ragged batch of new tokens over a paged cache with a cached prefix.

    q: ``[T, Hq, D]``, the new tokens of all requests back to back; ``cu_seqlens_q``:
    ``[B + 1]`` int32 offsets into q. Request b has ``q_len = cu[b+1] - cu[b]`` new tokens
    at absolute positions ``seq_lens[b] - q_len .. seq_lens[b] - 1`` (its prefix is cached).
    Rows of q past ``cu_seqlens_q[-1]`` are padding and come back as zeros.
    """
    out = torch.zeros_like(q)
    for b in range(page_table.shape[0]):
        start, end = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        n = int(seq_lens[b])
        if end == start:
            continue
        k = gather_kv(k_cache, page_table[b], n)
        v = gather_kv(v_cache, page_table[b], n)
        pos = torch.arange(n - (end - start), n, device=q.device)
        out[start:end] = _attend(q[start:end], k, v, scale, pos).to(q.dtype)
    return out
