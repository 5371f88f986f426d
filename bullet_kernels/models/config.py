"""The shape of a Llama-architecture model, read from a Hugging Face ``config.json``.

Supported: Llama 3.x (with the Llama 3.1 ``llama3`` rope scaling), Qwen3 dense (per-head q/k
RMSNorm, explicit ``head_dim``) and SmolLM2 (Llama with tied embeddings). Anything else is
refused up front with :class:`UnsupportedModelError` rather than run with wrong numerics.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from ..errors import BulletError

# model_type -> the causal-LM class name Hugging Face writes into "architectures"
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class ModelConfigError(BulletError, ValueError):
    """A model config that is incomplete or inconsistent."""


class UnsupportedModelError(ModelConfigError):
    """A model (or a feature of it) that this runner does not implement."""


def _supported_list() -> str:
    return ", ".join(f"{t} ({a})" for t, a in SUPPORTED_ARCHITECTURES.items())


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1 rope scaling: stretch long wavelengths by ``factor``, keep short ones."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        if self.factor <= 0 or not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ModelConfigError(
                f"llama3 rope_scaling needs factor > 0 and 0 < low_freq_factor < high_freq_factor, "
                f"got {self}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str  # a key of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.architecture!r} is not supported; supported: {_supported_list()}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"rotary needs an even head_dim, got {self.head_dim}")

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalises each head of q and k before rotary."""
        return self.architecture == "qwen3"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, source: Mapping[str, Any] | str | os.PathLike | Any) -> "ModelConfig":
        """From a ``config.json`` dict, its path, a directory holding it, or a transformers config."""
        return _parse_hf(_read_hf_dict(source))

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict (transformers 4.x layout, which 5.x also reads)."""
        scaling = None
        if self.rope_scaling is not None:
            scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        eos = list(self.eos_token_ids)
        return {
            "architectures": [SUPPORTED_ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        }


def _read_hf_dict(source) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    if hasattr(source, "to_dict"):  # a transformers PretrainedConfig
        return source.to_dict()
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelConfigError(f"no model config at {path}: expected a Hugging Face config.json") from None


def _architecture(cfg: Mapping[str, Any]) -> str:
    model_type = cfg.get("model_type")
    declared = cfg.get("architectures") or []
    if model_type is None and declared:  # some exported configs only name the class
        by_class = {a: t for t, a in SUPPORTED_ARCHITECTURES.items()}
        model_type = next((by_class[a] for a in declared if a in by_class), None)
    if model_type not in SUPPORTED_ARCHITECTURES or (
        declared and SUPPORTED_ARCHITECTURES[model_type] not in declared
    ):
        raise UnsupportedModelError(
            f"model_type {cfg.get('model_type')!r} with architectures {declared or None} is not "
            f"supported; supported: {_supported_list()}"
        )
    return model_type


def _rope(cfg: Mapping[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    # transformers 4.x writes rope_theta + rope_scaling; 5.x folds both into rope_parameters.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or params)
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedModelError(
            f"rope_scaling type {rope_type!r} is not supported; supported: none/default and llama3"
        )
    try:
        return float(theta), Llama3RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ModelConfigError(f"llama3 rope_scaling lacks {e.args[0]!r}: got {scaling}") from None


def _refuse_unsupported_features(cfg: Mapping[str, Any]) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported; only silu (SwiGLU)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise UnsupportedModelError(f"{flag}=true is not supported: projections have no bias")
    sliding = cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or ())
    if sliding:
        raise UnsupportedModelError("sliding-window attention is not supported")


def _parse_hf(cfg: Mapping[str, Any]) -> ModelConfig:
    architecture = _architecture(cfg)
    _refuse_unsupported_features(cfg)
    theta, scaling = _rope(cfg)

    def required(key: str):
        if key not in cfg or cfg[key] is None:
            raise ModelConfigError(f"{architecture} config lacks {key!r}")
        return cfg[key]

    hidden, heads = int(required("hidden_size")), int(required("num_attention_heads"))
    eos = cfg.get("eos_token_id")
    eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return ModelConfig(
        architecture=architecture,
        vocab_size=int(required("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(required("intermediate_size")),
        num_layers=int(required("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )
