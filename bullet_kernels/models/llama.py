"""Llama-architecture decoder (Llama 3.x, Qwen3 dense, SmolLM2) over a paged KV cache.

Every op except the embedding lookup goes through :mod:`bullet_kernels.kernels` (matmuls via
``kernels.linear``, i.e. ``F.linear`` unless the dispatcher picks our GEMM), so the dispatcher
decides which implementation runs. The forward is CUDA-graph capturable: it never syncs with
the host or branches on tensor values, and its shapes depend only on the
:class:`~bullet_kernels.engine.batch.ForwardBatch` bucket. Python branches are on static facts only
(``batch.is_decode``, the config).

Weights are fused where one GEMM can do the work of several: ``qkv_proj = cat(q, k, v)`` and
``gate_up_proj = cat(gate, up)`` (see :mod:`.weights` for the Hugging Face mapping).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..engine.batch import ForwardBatch
from .config import Llama3RopeScaling, ModelConfig

DEFAULT_MAX_CONTEXT = 8192


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """The ``head_dim // 2`` rotary frequencies (float64), with Llama 3.1 scaling if configured."""
    d = config.head_dim
    inv_freq = config.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    if config.rope_scaling is not None:
        inv_freq = _llama3_scaled(inv_freq, config.rope_scaling)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, s: Llama3RopeScaling) -> torch.Tensor:
    # Measured in wavelengths per original context: high-frequency components (many turns per
    # context) are kept, low-frequency ones are slowed by `factor`, and the band in between is
    # a linear blend of the two, so the frequency curve stays continuous.
    turns = s.original_max_position_embeddings * inv_freq / (2 * math.pi)
    keep = ((turns - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).clamp(0, 1)
    return keep * inv_freq + (1 - keep) * inv_freq / s.factor


def rotary_cos_sin_cache(config: ModelConfig, max_positions: int, device=None) -> torch.Tensor:
    """``[max_positions, head_dim]`` fp32 ``cat([cos, sin], -1)``, the layout the kernels take."""
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), rope_inv_freq(config))
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float().to(device)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device=None):
        super().__init__()
        self.config = config

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)

        h, c = config.hidden_size, config
        self.input_norm = param(h)
        self.qkv_proj = param(c.q_size + 2 * c.kv_size, h)
        self.q_norm = param(c.head_dim) if c.qk_norm else None
        self.k_norm = param(c.head_dim) if c.qk_norm else None
        self.o_proj = param(h, c.q_size)
        self.post_attention_norm = param(h)
        self.gate_up_proj = param(2 * c.intermediate_size, h)
        self.down_proj = param(h, c.intermediate_size)
        # Views into the PagedKVCache, set by LlamaModel.attach_kv_cache; not part of state_dict.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, hidden, residual, batch: ForwardBatch, cos_sin_cache):
        eps = self.config.rms_norm_eps
        x, residual = kernels.fused_add_rms_norm(hidden, residual, self.input_norm, eps)
        x = self._attention(x, batch, cos_sin_cache)
        x, residual = kernels.fused_add_rms_norm(x, residual, self.post_attention_norm, eps)
        x = kernels.linear(kernels.silu_and_mul(kernels.linear(x, self.gate_up_proj)), self.down_proj)
        return x, residual

    def _attention(self, x, batch: ForwardBatch, cos_sin_cache):
        c = self.config
        tokens = x.shape[0]
        q, k, v = kernels.linear(x, self.qkv_proj).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(tokens, c.num_heads, c.head_dim)
        k = k.view(tokens, c.num_kv_heads, c.head_dim)
        v = v.view(tokens, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q = kernels.rms_norm(q, self.q_norm, c.rms_norm_eps)
            k = kernels.rms_norm(k, self.k_norm, c.rms_norm_eps)
        q, _ = kernels.rotary_and_store_kv(
            q, k, v, batch.positions, cos_sin_cache, self.k_cache, self.v_cache, batch.slot_mapping
        )
        scale = c.head_dim**-0.5
        if batch.is_decode:
            out = kernels.paged_decode_attention(
                q, self.k_cache, self.v_cache, batch.page_table, batch.seq_lens, scale
            )
        else:
            out = kernels.paged_prefill_attention(
                q, self.k_cache, self.v_cache, batch.page_table, batch.cu_seqlens_q,
                batch.seq_lens, scale,
            )
        return kernels.linear(out.reshape(tokens, c.q_size), self.o_proj)


class LlamaModel(nn.Module):
    """The decoder split into stages a graph bank can capture separately.

    ``embed`` -> ``layers_forward`` (any range of layers, any number of times) -> ``final``.
    The residual stream travels as an explicit ``(hidden, residual)`` pair; it starts at zero so
    every layer has the same signature (adding zero is exact in any dtype).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        max_context: int | None = None,
    ):
        super().__init__()
        if max_context is None:
            max_context = min(DEFAULT_MAX_CONTEXT, config.max_position_embeddings)
        if not 0 < max_context <= config.max_position_embeddings:
            raise ValueError(
                f"max_context {max_context} must be in 1..{config.max_position_embeddings} "
                "(the model's max_position_embeddings)"
            )
        self.config = config
        self.max_context = max_context
        v, h = config.vocab_size, config.hidden_size
        self.embed_tokens = nn.Parameter(torch.empty(v, h, dtype=dtype, device=device), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype, device) for _ in range(config.num_layers))
        self.norm = nn.Parameter(torch.empty(h, dtype=dtype, device=device), requires_grad=False)
        if config.tie_word_embeddings:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = nn.Parameter(torch.empty(v, h, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer(
            "cos_sin_cache", rotary_cos_sin_cache(config, max_context, device), persistent=False
        )

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    def _apply(self, fn, recurse=True):
        # model.to(bf16) would also round the rotary table; the kernels need it in fp32.
        super()._apply(fn, recurse)
        if self.cos_sin_cache.dtype != torch.float32:
            self.cos_sin_cache = rotary_cos_sin_cache(
                self.config, self.max_context, self.cos_sin_cache.device
            )
        return self

    def attach_kv_cache(self, kv_cache) -> None:
        """Point every layer at its k/v pages in ``kv_cache`` (a :class:`PagedKVCache`)."""
        if kv_cache.num_layers != self.config.num_layers:
            raise ValueError(
                f"the KV cache has {kv_cache.num_layers} layers, the model {self.config.num_layers}"
            )
        for layer, k, v in zip(self.layers, kv_cache.k_caches, kv_cache.v_caches):
            layer.k_cache, layer.v_cache = k, v

    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T]`` token ids -> ``(hidden, residual)``, each ``[T, hidden_size]``."""
        hidden = F.embedding(input_ids, self.embed_tokens)
        return hidden, torch.zeros_like(hidden)

    def layers_forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor,
        batch: ForwardBatch,
        start: int = 0,
        end: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run layers ``[start, end)``; returns the ``(hidden, residual)`` pair for the next group."""
        if self.layers[0].k_cache is None:
            raise RuntimeError("no KV cache attached: call model.attach_kv_cache(cache) first")
        with kernels.gemm_phase("decode" if batch.is_decode else "prefill"):
            for layer in self.layers[start:end]:
                hidden, residual = layer(hidden, residual, batch, self.cos_sin_cache)
        return hidden, residual

    def final(
        self, hidden: torch.Tensor, residual: torch.Tensor, logits_indices: torch.Tensor
    ) -> torch.Tensor:
        """Final norm and lm_head on the rows ``logits_indices`` only -> fp32 ``[len, vocab]``."""
        hidden, residual = hidden[logits_indices], residual[logits_indices]
        normed, _ = kernels.fused_add_rms_norm(hidden, residual, self.norm, self.config.rms_norm_eps)
        return kernels.linear(normed, self.lm_head).float()

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        hidden, residual = self.embed(input_ids)
        hidden, residual = self.layers_forward(hidden, residual, batch)
        return self.final(hidden, residual, batch.logits_indices)
