"""Load Hugging Face-layout weights into :class:`LlamaModel`: safetensors, a transformers model, GGUF.

The checkpoint is checked against the config before anything is copied: every expected tensor
present with the expected shape, nothing unexpected, every tensor floating point. Floating
tensors are cast to the model dtype; integer (quantized) tensors are refused, because casting
them would silently produce garbage. q/k/v and gate/up are written into the fused weights.
"""

from __future__ import annotations

import contextlib
import glob
import os
from typing import Callable, Iterable, Mapping, NamedTuple

import torch

from ..errors import BulletError
from .config import ModelConfig
from .llama import LlamaModel

_MAX_LISTED_PROBLEMS = 8


class WeightsError(BulletError, ValueError):
    """A checkpoint that does not match the model config."""


class _TensorInfo(NamedTuple):
    shape: tuple[int, ...]
    dtype: str  # as the checkpoint names it: "bfloat16", "I8", ...
    floating: bool


class _Checkpoint:
    """Name -> (shape, dtype) known up front, tensor data read on demand."""

    def __init__(self, infos: Mapping[str, _TensorInfo], read: Callable[[str], torch.Tensor]):
        self.infos, self.read = dict(infos), read

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "_Checkpoint":
        infos = {
            n: _TensorInfo(tuple(t.shape), str(t.dtype).removeprefix("torch."), t.is_floating_point())
            for n, t in state_dict.items()
        }
        return cls(infos, state_dict.__getitem__)


def _fused_sources(config: ModelConfig) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Our parameter name -> the HF tensors (name, shape) concatenated along dim 0 to make it."""
    c, h = config, config.hidden_size
    out = {"embed_tokens": [("model.embed_tokens.weight", (c.vocab_size, h))],
           "norm": [("model.norm.weight", (h,))]}
    if not c.tie_word_embeddings:
        out["lm_head"] = [("lm_head.weight", (c.vocab_size, h))]
    for i in range(c.num_layers):
        p, ours = f"model.layers.{i}.", f"layers.{i}."
        out[ours + "input_norm"] = [(p + "input_layernorm.weight", (h,))]
        out[ours + "qkv_proj"] = [
            (p + "self_attn.q_proj.weight", (c.q_size, h)),
            (p + "self_attn.k_proj.weight", (c.kv_size, h)),
            (p + "self_attn.v_proj.weight", (c.kv_size, h)),
        ]
        out[ours + "o_proj"] = [(p + "self_attn.o_proj.weight", (h, c.q_size))]
        if c.qk_norm:
            out[ours + "q_norm"] = [(p + "self_attn.q_norm.weight", (c.head_dim,))]
            out[ours + "k_norm"] = [(p + "self_attn.k_norm.weight", (c.head_dim,))]
        out[ours + "post_attention_norm"] = [(p + "post_attention_layernorm.weight", (h,))]
        out[ours + "gate_up_proj"] = [
            (p + "mlp.gate_proj.weight", (c.intermediate_size, h)),
            (p + "mlp.up_proj.weight", (c.intermediate_size, h)),
        ]
        out[ours + "down_proj"] = [(p + "mlp.down_proj.weight", (h, c.intermediate_size))]
    return out


def expected_hf_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``config`` must hold, with its shape."""
    return {name: shape for parts in _fused_sources(config).values() for name, shape in parts}


def _tolerated_extra(name: str, config: ModelConfig) -> bool:
    # Rotary tables are recomputed; a tied checkpoint may still carry its lm_head copy.
    return name.endswith("rotary_emb.inv_freq") or (
        config.tie_word_embeddings and name == "lm_head.weight"
    )


def _validate(ckpt: _Checkpoint, config: ModelConfig) -> None:
    expected = expected_hf_tensors(config)
    problems = []
    for name, shape in expected.items():
        info = ckpt.infos.get(name)
        if info is None:
            problems.append(f"missing tensor {name!r} (expected shape {shape})")
        elif info.shape != shape:
            problems.append(f"tensor {name!r}: expected shape {shape}, got {info.shape}")
        elif not info.floating:
            problems.append(
                f"tensor {name!r} has dtype {info.dtype}, not a floating type: quantized or integer "
                "weights are not supported, dequantize them first (GGUF: use load_gguf)"
            )
    problems += [
        f"unexpected tensor {name!r} (shape {info.shape})"
        for name, info in ckpt.infos.items()
        if name not in expected and not _tolerated_extra(name, config)
    ]
    if problems:
        shown = problems[:_MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise WeightsError(
            f"checkpoint does not match the {config.architecture} config "
            f"({config.num_layers} layers, hidden {config.hidden_size}):\n  "
            + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else "")
        )


@torch.no_grad()
def _copy_into(model: LlamaModel, ckpt: _Checkpoint) -> None:
    _validate(ckpt, model.config)
    params = dict(model.named_parameters())
    for ours, parts in _fused_sources(model.config).items():
        target, row = params[ours], 0
        for name, shape in parts:  # write each piece into its rows: no concatenated copy
            target[row : row + shape[0]].copy_(ckpt.read(name))
            row += shape[0]


def load_state_dict(model: LlamaModel, state_dict: Mapping[str, torch.Tensor]) -> LlamaModel:
    """Fill ``model`` from a Hugging Face-named state dict (validated first, then cast)."""
    _copy_into(model, _Checkpoint.from_state_dict(state_dict))
    return model


def _safetensors_checkpoint(files: Iterable[str], stack) -> _Checkpoint:
    from safetensors import safe_open

    infos, handles = {}, {}
    for path in files:
        f = stack.enter_context(safe_open(path, framework="pt"))
        for name in f.keys():
            sl = f.get_slice(name)
            dtype = sl.get_dtype()  # e.g. "BF16", "F32", "I8", "F8_E4M3"
            infos[name] = _TensorInfo(tuple(sl.get_shape()), dtype, dtype.startswith(("F", "BF")))
            handles[name] = f
    return _Checkpoint(infos, lambda name: handles[name].get_tensor(name))


def load_safetensors(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    max_context: int | None = None,
) -> LlamaModel:
    """A model from a Hugging Face directory (``config.json`` + ``*.safetensors``)."""
    path = os.fspath(path)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise WeightsError(f"no *.safetensors files in {path}")
    model = LlamaModel(ModelConfig.from_hf(path), dtype=dtype, device=device, max_context=max_context)
    with contextlib.ExitStack() as stack:
        _copy_into(model, _safetensors_checkpoint(files, stack))
    return model


def from_transformers(
    hf_model,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    max_context: int | None = None,
) -> LlamaModel:
    """A copy of a transformers ``LlamaForCausalLM``/``Qwen3ForCausalLM`` (weights cast to ``dtype``)."""
    config = ModelConfig.from_hf(hf_model.config)
    dtype = dtype or next(hf_model.parameters()).dtype
    model = LlamaModel(config, dtype=dtype, device=device, max_context=max_context)
    return load_state_dict(model, hf_model.state_dict())


def load_gguf(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    max_context: int | None = None,
) -> LlamaModel:
    """A model from a ``.gguf`` file, dequantized by transformers (needs the ``gguf`` package)."""
    from transformers import AutoModelForCausalLM

    path = os.fspath(path)
    hf_model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path) or ".", gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return from_transformers(hf_model, dtype=dtype, device=device, max_context=max_context)


def load_model(path: str | os.PathLike, **kwargs) -> LlamaModel:
    """:func:`load_gguf` for a ``.gguf`` file, else :func:`load_safetensors` for a directory."""
    loader = load_gguf if os.fspath(path).endswith(".gguf") else load_safetensors
    return loader(path, **kwargs)
