"""Llama-architecture models (Llama 3.x, Qwen3 dense, SmolLM2): config, weights, presets."""

from __future__ import annotations

from .config import (
    SUPPORTED_ARCHITECTURES,
    Llama3RopeScaling,
    ModelConfig,
    ModelConfigError,
    UnsupportedModelError,
)
from .llama import LlamaModel, rope_inv_freq, rotary_cos_sin_cache
from .presets import PRESETS, init_random_, preset_config, random_model
from .weights import (
    WeightsError,
    expected_hf_tensors,
    from_transformers,
    load_gguf,
    load_model,
    load_safetensors,
    load_state_dict,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "PRESETS",
    "Llama3RopeScaling",
    "LlamaModel",
    "ModelConfig",
    "ModelConfigError",
    "UnsupportedModelError",
    "WeightsError",
    "expected_hf_tensors",
    "from_transformers",
    "init_random_",
    "load_gguf",
    "load_model",
    "load_safetensors",
    "load_state_dict",
    "preset_config",
    "random_model",
    "rope_inv_freq",
    "rotary_cos_sin_cache",
]
