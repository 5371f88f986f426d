"""Named model shapes with random weights: benchmarks and tests run without downloading anything.

The configs are the published ``config.json`` numbers (only the fields we read). Random weights
are deterministic for a seed on a given device type and scaled so bf16 activations stay tame
through deep stacks: std 0.02, output projections (``o_proj``, ``down_proj``) shrunk by
``1/sqrt(2 * num_layers)`` so the residual stream grows slowly, norm weights 1.

``llama-3.1-8b`` also ships as a complete Hugging Face style model directory (a full
``config.json`` with Llama-3.1-8B's published shapes and the bos/eos ids 0/1 of the project's
own small tokenizer, ``models/tokenizer.py``):
:func:`write_model_dir` writes it, so our engine and an SGLang baseline started with
``--load-format dummy`` see the same shapes and count the same tokens. Its ``config.json`` keeps
the published one's ``transformers_version`` (4.43.0.dev0): without it, transformers 5 suspects a
local tokenizer (ours padded to 128,256 ids) of an old Mistral regex and warns that tokenization
is wrong.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

from .config import ModelConfig, UnsupportedModelError
from .llama import LlamaModel
from .tokenizer import ASSET as TOKENIZER_ASSET
from .tokenizer import asset_text, padded_json

PRESETS: dict[str, dict] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 32, "head_dim": 128, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    },
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 36, "head_dim": 128, "vocab_size": 151936,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
    },
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
        "num_key_value_heads": 3, "num_hidden_layers": 30, "head_dim": 64, "vocab_size": 49152,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 100000.0,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    },
    # Tiny shapes for CPU tests, each exercising one architecture feature.
    "tiny-llama3": {  # GQA + llama3 rope scaling with all three frequency bands in use
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 512, "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32, "rope_type": "llama3"},
    },
    "tiny-qwen3": {  # q/k norm, head_dim * heads != hidden_size
        "model_type": "qwen3", "hidden_size": 64, "intermediate_size": 96,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "head_dim": 32, "vocab_size": 256, "max_position_embeddings": 512, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "tie_word_embeddings": False,
    },
    "tiny-tied": {  # SmolLM2-like: tied embeddings, a single KV head
        "model_type": "llama", "hidden_size": 48, "intermediate_size": 96,
        "num_attention_heads": 3, "num_key_value_heads": 1, "num_hidden_layers": 3,
        "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 512, "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0, "tie_word_embeddings": True,
    },
}


# Presets that ship a whole model directory under assets/<name>/ (config, tokenizer config,
# generation config; the tokenizer itself is the shared assets/tokenizer.json).
MODEL_DIR_FILES = ("config.json", "tokenizer_config.json", "generation_config.json")
PRESETS_WITH_MODEL_DIR = ("llama-3.1-8b",)


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UnsupportedModelError(f"no preset {name!r}; presets: {', '.join(PRESETS)}")
    return ModelConfig.from_hf(PRESETS[name])


def _check_model_dir_preset(name: str) -> None:
    if name not in PRESETS_WITH_MODEL_DIR:
        raise UnsupportedModelError(
            f"preset {name!r} ships no tokenizer or model directory; "
            f"presets that do: {', '.join(PRESETS_WITH_MODEL_DIR)}"
        )


def shipped_config(name: str) -> dict:
    """The full ``config.json`` shipped for preset ``name`` (every field a Hugging Face config has)."""
    _check_model_dir_preset(name)
    return json.loads(asset_text(name, "config.json"))


def preset_tokenizer(name: str):
    """The ``tokenizers.Tokenizer`` of preset ``name``: the project's byte-level BPE padded to the
    preset's vocabulary (:func:`.tokenizer.padded_json`), as a server of the preset uses it.

    Its ``<s>``/``</s>`` are the preset's bos/eos ids, it encodes as the trained one does, and
    every id the model can emit decodes to text, ours and SGLang's (its model directory) alike.
    """
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_padded_tokenizer_json(name))


@functools.lru_cache(maxsize=None)
def _padded_tokenizer_json(name: str) -> str:
    return padded_json(asset_text(TOKENIZER_ASSET), shipped_config(name)["vocab_size"])


def write_model_dir(name: str, path: str | Path, pad_vocab: bool = True) -> Path:
    """Write preset ``name`` as a Hugging Face style model directory at ``path`` and return it.

    ``config.json``, ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json``
    (no weights: load them random, e.g. SGLang's ``--load-format dummy`` or :func:`random_model`).
    The tokenizer is ours with its vocabulary padded to the model's (:func:`.tokenizer.padded_json`:
    every id the model can emit decodes to text; encoding is unchanged), or as trained with
    ``pad_vocab=False`` (what a benchmark client makes its prompts with: SGLang's random-ids
    trace draws ids below the tokenizer's vocabulary size and sends their text, and most padding
    entries would come back as about five tokens each).
    Creates ``path`` if needed and overwrites those four files; other files are left alone.
    """
    _check_model_dir_preset(name)
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"cannot write preset {name!r} to {out}: it exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    for file in MODEL_DIR_FILES:
        (out / file).write_text(asset_text(name, file), encoding="utf-8")
    text = _padded_tokenizer_json(name) if pad_vocab else asset_text(TOKENIZER_ASSET)
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    return out


@torch.no_grad()
def init_random_(model: LlamaModel, seed: int = 0, std: float = 0.02) -> LlamaModel:
    """Overwrite every weight with seeded random values (drawn in fp32, then cast)."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    residual_std = std / math.sqrt(2 * model.config.num_layers)
    for name, p in model.named_parameters():  # a tied lm_head is listed once
        if p.ndim == 1:
            p.fill_(1.0)
            continue
        scale = residual_std if name.endswith(("o_proj", "down_proj")) else std
        p.copy_(torch.randn(p.shape, generator=gen, device=p.device) * scale)
    return model


def random_model(
    preset: str | ModelConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    max_context: int | None = None,
) -> LlamaModel:
    """A model of a preset (or any config) with :func:`init_random_` weights."""
    config = preset_config(preset) if isinstance(preset, str) else preset
    return init_random_(LlamaModel(config, dtype=dtype, device=device, max_context=max_context), seed)
