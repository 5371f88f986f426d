"""EngineConfig: defaults, validation naming what is allowed, environment overrides in one place."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import bullet_kernels
from bullet_kernels.config import ENV_FIELDS, EngineConfig, KernelSettings, kernel_settings


def test_defaults_and_buckets_stored_as_sorted_tuples():
    cfg = EngineConfig()
    assert (cfg.page_size, cfg.decode_buckets, cfg.prefill_buckets) == (16, (1, 8, 32, 128), (512, 2048))
    assert (cfg.prefill_max_seqs, cfg.layer_groups, cfg.backend) == (8, 4, "green")
    assert (cfg.kv_num_pages, cfg.kv_budget_bytes, cfg.gpu_memory_fraction, cfg.max_context) == (None, None, 0.9, None)
    assert cfg.lazy_capture is False
    cfg = EngineConfig(decode_buckets=[32, 1, 8, 8], prefill_buckets=range(512, 1025, 512))
    assert cfg.decode_buckets == (1, 8, 32) and cfg.prefill_buckets == (512, 1024)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.page_size = 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(page_size=0), "page_size must be a positive integer, got 0"),
    (dict(page_size=16.0), "page_size must be a positive integer, got 16.0"),
    (dict(decode_buckets=()), "decode_buckets needs at least one bucket"),
    (dict(prefill_buckets=[512, -1]), "every entry of prefill_buckets must be a positive integer, got -1"),
    (dict(decode_buckets="1,8"), "decode_buckets must be a list of positive integers"),
    (dict(prefill_max_seqs=0), "prefill_max_seqs must be a positive integer"),
    (dict(layer_groups=True), "layer_groups must be a positive integer, got True"),
    (dict(backend="cuda"), "backend must be one of green, tpc, none, got 'cuda'"),
    (dict(kv_num_pages=0), "kv_num_pages must be a positive integer"),
    (dict(kv_num_pages=8, kv_budget_bytes=1 << 20), "give at most one of kv_num_pages \\(8\\) and kv_budget_bytes"),
    (dict(gpu_memory_fraction=0), "gpu_memory_fraction must be in \\(0, 1\\], got 0"),
    (dict(gpu_memory_fraction=1.5), "gpu_memory_fraction must be in \\(0, 1\\], got 1.5"),
    (dict(max_context=-4), "max_context must be a positive integer, got -4"),
    (dict(lazy_capture="yes"), "lazy_capture must be True or False"),
])
def test_bad_values_are_named_with_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_from_env_reads_overrides_and_keywords_win(monkeypatch):
    for variable, _ in ENV_FIELDS.values():
        monkeypatch.delenv(variable, raising=False)
    assert EngineConfig.from_env() == EngineConfig()
    monkeypatch.setenv("BULLET_PAGE_SIZE", "32")
    monkeypatch.setenv("BULLET_DECODE_BUCKETS", "8, 1,64")
    monkeypatch.setenv("BULLET_BACKEND", "tpc")
    monkeypatch.setenv("BULLET_KV_BUDGET_BYTES", str(1 << 30))
    monkeypatch.setenv("BULLET_GPU_MEMORY_FRACTION", "0.5")
    monkeypatch.setenv("BULLET_LAZY_CAPTURE", "yes")
    cfg = EngineConfig.from_env(page_size=8)
    assert cfg == EngineConfig(page_size=8, decode_buckets=(1, 8, 64), backend="tpc", kv_budget_bytes=1 << 30,
                               gpu_memory_fraction=0.5, lazy_capture=True)
    # a keyword wins even where its environment value is bad
    monkeypatch.setenv("BULLET_LAYER_GROUPS", "four")
    assert EngineConfig.from_env(layer_groups=2).layer_groups == 2
    with pytest.raises(ValueError, match="BULLET_LAYER_GROUPS='four' is not an integer"):
        EngineConfig.from_env()


def test_from_env_names_the_variable_behind_a_bad_value(monkeypatch):
    for variable, _ in ENV_FIELDS.values():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("BULLET_GPU_MEMORY_FRACTION", "2")
    with pytest.raises(ValueError, match=r"gpu_memory_fraction must be in .*BULLET_GPU_MEMORY_FRACTION='2'"):
        EngineConfig.from_env()
    monkeypatch.setenv("BULLET_GPU_MEMORY_FRACTION", "0.8")
    monkeypatch.setenv("BULLET_LAZY_CAPTURE", "maybe")
    with pytest.raises(ValueError, match="BULLET_LAZY_CAPTURE='maybe' is not a flag"):
        EngineConfig.from_env()
    with pytest.raises(TypeError, match="unknown EngineConfig field\\(s\\) page; fields: page_size"):
        EngineConfig.from_env(page=4)


def test_kernel_settings_validate_and_follow_the_environment(monkeypatch):
    monkeypatch.delenv("BULLET_KERNELS", raising=False)
    monkeypatch.delenv("BULLET_LINEAR", raising=False)
    monkeypatch.delenv("BULLET_DECODE_MERGE", raising=False)
    default = kernel_settings()
    assert default == KernelSettings("triton", "cublaslt-target", "cublas", "separate")  # measured (config.py)
    monkeypatch.setenv("BULLET_DECODE_MERGE", " Fused")
    assert kernel_settings().decode_merge == "fused"
    monkeypatch.setenv("BULLET_DECODE_MERGE", "atomic")
    with pytest.raises(ValueError, match="BULLET_DECODE_MERGE='atomic' is not one of separate, fused"):
        kernel_settings()
    monkeypatch.delenv("BULLET_DECODE_MERGE")
    assert (default.linear("decode"), default.linear("prefill")) == ("cublaslt-target", "cublas")
    monkeypatch.setenv("BULLET_KERNELS", "reference")
    monkeypatch.setenv("BULLET_LINEAR", "Triton")
    assert kernel_settings() == KernelSettings("reference", "triton", "triton")
    monkeypatch.setenv("BULLET_LINEAR", "prefill=triton")  # decode keeps its default
    assert kernel_settings() == KernelSettings("reference", "cublaslt-target", "triton")
    monkeypatch.setenv("BULLET_LINEAR", " decode = cublas , prefill=cublaslt-target")
    assert kernel_settings() == KernelSettings("reference", "cublas", "cublaslt-target")
    with pytest.raises(ValueError, match="phase must be one of decode, prefill, got 'mixed'"):
        kernel_settings().linear("mixed")
    for bad, says in (("cutlass", "BULLET_LINEAR='cutlass': expected one of cublas, triton, cublaslt-target"),
                      ("decode=cutlass", "'decode=cutlass' is not <phase>=<gemm>"),
                      ("mixed=cublas", "'mixed=cublas' is not <phase>=<gemm>"),
                      ("decode=cublas,decode=triton", "'decode=triton' is not <phase>=<gemm> .* \\(each once\\)")):
        monkeypatch.setenv("BULLET_LINEAR", bad)
        with pytest.raises(ValueError, match=says):
            kernel_settings()


def test_engine_variables_are_read_only_in_config_py():
    engine_variables = {v for v, _ in ENV_FIELDS.values()} | {"BULLET_KERNELS", "BULLET_LINEAR", "BULLET_DECODE_MERGE"}
    package = Path(bullet_kernels.__file__).parent
    readers = {}
    for path in package.rglob("*.py"):
        if path.name == "config.py" and path.parent == package:
            continue
        text = path.read_text()
        named = set(re.findall(r"BULLET_[A-Z_]+", text)) & engine_variables
        if named and re.search(r"os\.environ|getenv", text):
            readers[str(path.relative_to(package))] = sorted(named)
    assert readers == {}


def test_splits_are_parsed_deduplicated_and_read_from_the_environment(monkeypatch):
    from bullet_kernels.partition import SMSplit

    cfg = EngineConfig(splits=["prefill=96,decode=36", SMSplit(prefill=96, decode=36), "decode=16"])
    assert cfg.splits == (SMSplit(prefill=96, decode=36), SMSplit(decode=16))
    monkeypatch.setenv("BULLET_SPLITS", "prefill=104,decode=28;decode=16")
    assert EngineConfig.from_env().splits == (SMSplit(prefill=104, decode=28), SMSplit(decode=16))


def test_a_bad_split_names_what_is_allowed():
    import pytest

    with pytest.raises(ValueError):
        EngineConfig(splits=["prefill=abc"])
    with pytest.raises(ValueError, match="SMSplit values or text"):
        EngineConfig(splits=[42])
