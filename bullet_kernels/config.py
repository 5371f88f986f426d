"""Engine settings: one frozen :class:`EngineConfig` passed down, environment overrides read here.

Code below this module takes an ``EngineConfig`` (or a value from :func:`kernel_settings`); no
other engine module reads ``BULLET_*`` variables. Precedence: the dataclass defaults, then the
environment (:meth:`EngineConfig.from_env`), then the keyword arguments given to ``from_env``.

Environment variables of the project:

==============================  ==============================================================
variable                        meaning (read by)
==============================  ==============================================================
BULLET_PAGE_SIZE                KV tokens per page, e.g. ``16`` (EngineConfig.from_env)
BULLET_DECODE_BUCKETS           decode batch buckets, e.g. ``1,8,32,128`` (from_env)
BULLET_PREFILL_BUCKETS          prefill token buckets, e.g. ``512,2048`` (from_env)
BULLET_PREFILL_MAX_SEQS         sequences one prefill graph holds (from_env)
BULLET_LAYER_GROUPS             prefill layer groups, one graph each (from_env)
BULLET_BACKEND                  partition backend: green, tpc or none (from_env)
BULLET_KV_PAGES                 KV cache pages, exact (from_env)
BULLET_KV_BUDGET_BYTES          KV cache size in bytes (from_env)
BULLET_GPU_MEMORY_FRACTION      share of free GPU memory the engine may use, in (0, 1] (from_env)
BULLET_MAX_CONTEXT              tokens of context per request (from_env)
BULLET_LAZY_CAPTURE             ``1``: capture a missing graph on first use (from_env)
BULLET_SPLITS                   splits opened at start, ``;``-separated, e.g.
                                ``prefill=96,decode=36;decode=16`` (from_env)
BULLET_KERNELS                  ``triton`` (default) or ``reference``: force the reference
                                kernels everywhere, for A/B comparisons (kernel_settings)
BULLET_LINEAR                   the GEMM, one of ``cublas``, ``triton`` or ``cublaslt-target``
                                (cuBLASLt told the SM budget), for both phases or per phase:
                                ``decode=cublaslt-target,prefill=cublas`` (the default)
                                (kernel_settings)
BULLET_DECODE_MERGE             ``separate`` (default) or ``fused``: how decode attention merges
                                its KV splits, a second kernel or the last split program
                                (kernel_settings)
BULLET_TPC_MECHANISM            auto, record or hook (read by bullet_kernels.partition.tpc)
BULLET_TPC_STREAM_OFFSET        byte offset of the driver's stream mask, e.g. ``0x51c``
                                (read by bullet_kernels.partition.tpc)
BULLET_TPC_LIB                  path of the TPC-mask library (read by bullet_kernels.partition.tpc)
BULLET_GREEN_SETTLE_PROBES      re-probes of a green set that ran on fewer SMs than granted before
                                fresh contexts are made; default 0 (read by bullet_kernels.partition.green)
BULLET_GREEN_CARVE              ``split`` (default) or ``atoms``: how green lanes are cut from the
                                device's SMs (read by bullet_kernels.partition.green)
BULLET_CACHE_DIR                cache folder, default ``~/.cache/bullet_kernels``
                                (read by bullet_kernels.partition.tpc)
BULLET_COMMIT                   commit recorded in result files (read by bullet_kernels.results)
BULLET_OFFLINE                  ``1``: install without the package index (scripts/install.sh)
==============================  ==============================================================

Kernel settings are read at every call (a dictionary look-up, so a test or an A/B run can flip
them); a graph keeps the kernels it was captured with.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

KERNEL_CHOICES = ("triton", "reference")
LINEAR_CHOICES = ("cublas", "triton", "cublaslt-target")
# Decode attention's split merge (kernels.decode_attention). Separate: measured on the H200's
# 16/32/132-SM lanes (ea7b8de, docs/roofline.md), fused took 1.03x the time at the median (0.94-1.14x),
# winning only with a per-lane counter buffer kept by the caller, and then by a few percent.
DECODE_MERGES = ("separate", "fused")
DEFAULT_DECODE_MERGE = "separate"


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _buckets(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a list of positive integers, got {value!r}")
    values = [_positive_int(f"every entry of {name}", v) for v in value]
    if not values:
        raise ValueError(f"{name} needs at least one bucket, got none")
    return tuple(sorted(set(values)))


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything the engine is sized by. Lists are stored as sorted tuples."""

    page_size: int = 16  # KV tokens per page
    decode_buckets: tuple[int, ...] = (1, 8, 32, 128)  # decode batch sizes captured
    prefill_buckets: tuple[int, ...] = (512, 2048)  # prefill token counts captured
    prefill_max_seqs: int = 8  # sequences one prefill graph holds
    layer_groups: int = 4  # prefill graphs per bucket, at most one per layer (the split may change between groups)
    backend: str = "green"  # partition backend
    kv_num_pages: int | None = None  # exact KV size; wins over everything else
    kv_budget_bytes: int | None = None  # KV size in bytes
    gpu_memory_fraction: float = 0.9  # share of free GPU memory for KV + graphs (when not exact)
    max_context: int | None = None  # None: what the model's rotary table covers
    lazy_capture: bool = False  # capture a missing graph on first use instead of running eagerly
    # SM splits the runner opens and verifies when it starts, before any other GPU work: a green
    # split first opened after Inductor/cuBLAS work was seen running on an earlier lane's SMs
    # (docs/green-contexts.md). Placements may still name other splits; those open on first use.
    splits: tuple = ()

    def __post_init__(self) -> None:
        from .partition import BACKENDS

        _positive_int("page_size", self.page_size)
        object.__setattr__(self, "decode_buckets", _buckets("decode_buckets", self.decode_buckets))
        object.__setattr__(self, "prefill_buckets", _buckets("prefill_buckets", self.prefill_buckets))
        _positive_int("prefill_max_seqs", self.prefill_max_seqs)
        _positive_int("layer_groups", self.layer_groups)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in ("kv_num_pages", "kv_budget_bytes", "max_context"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.kv_num_pages is not None and self.kv_budget_bytes is not None:
            raise ValueError(
                f"give at most one of kv_num_pages ({self.kv_num_pages}) and kv_budget_bytes "
                f"({self.kv_budget_bytes}); with neither the cache is sized from free memory"
            )
        fraction = self.gpu_memory_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {fraction!r}")
        object.__setattr__(self, "splits", _splits(self.splits))
        if not isinstance(self.lazy_capture, bool):
            raise ValueError(f"lazy_capture must be True or False, got {self.lazy_capture!r}")

    @classmethod
    def from_env(cls, **overrides: Any) -> "EngineConfig":
        """Defaults, overridden by ``BULLET_*`` variables, overridden by ``overrides``."""
        environ = os.environ
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            allowed = ", ".join(f.name for f in dataclasses.fields(cls))
            raise TypeError(f"unknown EngineConfig field(s) {', '.join(sorted(unknown))}; fields: {allowed}")
        values = {}
        for field, (variable, parse) in ENV_FIELDS.items():
            raw = environ.get(variable, "").strip()
            if raw and field not in overrides:
                try:
                    values[field] = parse(raw)
                except ValueError:
                    raise ValueError(f"{variable}={raw!r} is not {_ENV_FORMS[parse]}") from None
        try:
            return cls(**values, **overrides)
        except ValueError as exc:  # name the variable a bad value came from
            from_env = [f"{ENV_FIELDS[f][0]}={environ[ENV_FIELDS[f][0]]!r}" for f in values]
            raise ValueError(f"{exc}" + (f" (environment: {', '.join(from_env)})" if from_env else "")) from None


def _splits(value) -> tuple:
    """SMSplit values (or their ``lane=SMS,...`` text), in order, each once."""
    from .partition import SMSplit

    if isinstance(value, (str, SMSplit)):
        value = (value,)
    out = []
    for item in value:
        split = SMSplit.parse(item) if isinstance(item, str) else item
        if not isinstance(split, SMSplit):
            raise ValueError(f"splits must be SMSplit values or text like 'prefill=96,decode=36', got {item!r}")
        if split not in out:
            out.append(split)
    return tuple(out)


def _split_list(raw: str) -> tuple:
    """``prefill=96,decode=36;prefill=104,decode=28``: splits separated by semicolons."""
    return _splits([part for part in raw.split(";") if part.strip()])


def _int_list(raw: str) -> tuple[int, ...]:
    return tuple(int(x) for x in raw.replace(" ", "").split(",") if x)


def _flag(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


_ENV_FORMS: dict[Callable, str] = {
    int: "an integer",
    float: "a number",
    str: "text",
    _int_list: "a comma-separated list of integers, e.g. 1,8,32",
    _flag: "a flag (1/0, true/false, yes/no, on/off)",
    _split_list: "splits separated by ';', e.g. prefill=96,decode=36;prefill=104,decode=28",
}

# EngineConfig field -> (the variable that overrides it, how its text is read)
ENV_FIELDS: dict[str, tuple[str, Callable]] = {
    "page_size": ("BULLET_PAGE_SIZE", int),
    "decode_buckets": ("BULLET_DECODE_BUCKETS", _int_list),
    "prefill_buckets": ("BULLET_PREFILL_BUCKETS", _int_list),
    "prefill_max_seqs": ("BULLET_PREFILL_MAX_SEQS", int),
    "layer_groups": ("BULLET_LAYER_GROUPS", int),
    "backend": ("BULLET_BACKEND", str),
    "kv_num_pages": ("BULLET_KV_PAGES", int),
    "kv_budget_bytes": ("BULLET_KV_BUDGET_BYTES", int),
    "gpu_memory_fraction": ("BULLET_GPU_MEMORY_FRACTION", float),
    "max_context": ("BULLET_MAX_CONTEXT", int),
    "lazy_capture": ("BULLET_LAZY_CAPTURE", _flag),
    "splits": ("BULLET_SPLITS", _split_list),
}


# The default GEMM per phase, measured on the H200 (bench/results/interference-*-01fb384, the
# same run for both): cuBLASLt told the lane's SM count made decode steps 2-13% faster on 32-80
# SM lanes (batch 128, 2048 context: 26.1 -> 23.9 ms on 32 SMs) and 1-3% on the whole GPU, but
# prefill layer groups up to 25% slower on lanes (4096 tokens on 52 SMs: 26.7 -> 33.4 ms), where
# cuBLAS's own choice wins. So decode GEMMs go to cuBLASLt with the target, prefill's to cuBLAS.
DEFAULT_LINEAR = {"decode": "cublaslt-target", "prefill": "cublas"}
PHASES = ("decode", "prefill")


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    kernels: str  # "triton" or "reference"
    linear_decode: str = DEFAULT_LINEAR["decode"]  # one of LINEAR_CHOICES, for decode steps' GEMMs
    linear_prefill: str = DEFAULT_LINEAR["prefill"]  # and for prefill (and fused prefill+decode) GEMMs
    decode_merge: str = DEFAULT_DECODE_MERGE  # one of DECODE_MERGES

    def linear(self, phase: str) -> str:
        """The GEMM of ``phase`` (``decode`` or ``prefill``)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
        return self.linear_decode if phase == "decode" else self.linear_prefill


def kernel_settings() -> KernelSettings:
    """``BULLET_KERNELS``, ``BULLET_LINEAR`` and ``BULLET_DECODE_MERGE`` as validated settings (see
    the module table)."""
    return _parse_kernel_settings(os.environ.get("BULLET_KERNELS", ""), os.environ.get("BULLET_LINEAR", ""),
                                  os.environ.get("BULLET_DECODE_MERGE", ""))


@functools.lru_cache(maxsize=8)
def _parse_kernel_settings(kernels: str, linear: str, merge: str = "") -> KernelSettings:
    # Validated once per distinct value: the kernel dispatcher calls this on every launch.
    kernels = kernels.strip().lower() or "triton"
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"BULLET_KERNELS={kernels!r} is not one of {', '.join(KERNEL_CHOICES)}")
    merge = merge.strip().lower() or DEFAULT_DECODE_MERGE
    if merge not in DECODE_MERGES:
        raise ValueError(f"BULLET_DECODE_MERGE={merge!r} is not one of {', '.join(DECODE_MERGES)}")
    return KernelSettings(kernels, **{f"linear_{p}": choice for p, choice in parse_linear(linear).items()},
                          decode_merge=merge)


def parse_linear(text: str) -> dict[str, str]:
    """``BULLET_LINEAR`` -> ``{"decode": ..., "prefill": ...}``: one choice for both phases
    (``cublas``), or per phase (``decode=cublaslt-target,prefill=cublas``; a phase left out keeps
    its default, :data:`DEFAULT_LINEAR`)."""
    text = text.strip().lower()
    allowed = f"one of {', '.join(LINEAR_CHOICES)}, or per phase, e.g. decode=cublaslt-target,prefill=cublas"
    if not text:
        return dict(DEFAULT_LINEAR)
    if "=" not in text:
        if text not in LINEAR_CHOICES:
            raise ValueError(f"BULLET_LINEAR={text!r}: expected {allowed}")
        return {p: text for p in PHASES}
    out = dict(DEFAULT_LINEAR)
    seen = set()
    for part in text.split(","):
        phase, _, choice = (x.strip() for x in part.partition("="))
        if phase not in PHASES or choice not in LINEAR_CHOICES or phase in seen:
            raise ValueError(f"BULLET_LINEAR={text!r}: {part.strip()!r} is not <phase>=<gemm> with phase in "
                             f"{'/'.join(PHASES)} (each once) and gemm {allowed}")
        seen.add(phase)
        out[phase] = choice
    return out
