"""The runner's request path on the CPU: placements, padding to a bucket, eager fallback counted
with its reason, KV sizing; and on the GPU, KV sized from free memory."""

from __future__ import annotations

import warnings

import pytest
import torch

from bullet_kernels.config import EngineConfig
from bullet_kernels.engine import (
    WHOLE_GPU, Bucket, EagerStep, GraphKey, ModelRunner, PagedKVCache, Placement, SeqChunk, capture_reserve_bytes,
    forget_warnings, kv_bytes_per_page, pad_input_ids, plan_decode, plan_prefill, size_kv_cache,
)
from bullet_kernels.errors import CaptureError, InvalidSplitError
from bullet_kernels.models import preset_config, random_model
from bullet_kernels.partition import SMSplit

PROMPT = [(7 * i + 3) % 256 for i in range(23)]
OTHER = [(5 * i + 1) % 256 for i in range(9)]
SPLIT = SMSplit(prefill=96, decode=36)


def make_runner(**cfg) -> ModelRunner:
    model = random_model("tiny-llama3", seed=0, dtype=torch.float32)
    return ModelRunner(model, EngineConfig(**{"kv_num_pages": 64, "page_size": 4, **cfg}))


# -- placement -----------------------------------------------------------------------------


def test_placement_forms_and_refusals():
    assert str(Placement(SPLIT, "decode")) == "prefill96-decode36:decode"
    assert Placement("prefill=96,decode=36", "decode") == Placement(SPLIT, "decode")
    assert Placement(None) == Placement.WHOLE_GPU == WHOLE_GPU and str(WHOLE_GPU) == "whole-gpu"
    assert WHOLE_GPU.whole_gpu and not Placement(SPLIT, "prefill").whole_gpu
    assert len({Placement(SPLIT, "decode"), Placement(SPLIT, "decode"), WHOLE_GPU}) == 2
    with pytest.raises(ValueError, match="split SMSplit\\(prefill=96, decode=36\\) has no lane 'main'; lanes: prefill, decode"):
        Placement(SPLIT)
    with pytest.raises(ValueError, match="a whole-GPU placement has the single lane 'main', got lane 'decode'"):
        Placement(None, "decode")
    with pytest.raises(InvalidSplitError, match="cannot read"):
        Placement("prefill96", "prefill")
    with pytest.raises(ValueError, match="has no lane 'main'"):
        GraphKey("decode", 8, SPLIT, "main")
    assert GraphKey("decode", 8, SPLIT, "decode").placement == Placement(SPLIT, "decode")


# -- padding -------------------------------------------------------------------------------


def test_pad_to_equals_planning_padded():
    chunks = [SeqChunk([3, 7], 2, 5), SeqChunk([1], 0, 2)]
    exact = plan_prefill(chunks, page_size=4, max_pages=3)
    padded = exact.pad_to(10, 3)
    direct = plan_prefill(chunks, page_size=4, max_pages=3, num_tokens=10, batch_size=3)
    assert padded.bucket == Bucket(False, 10, 3, 3) and not padded.is_decode
    assert all(torch.equal(a, b) for a, b in zip(padded.tensors().values(), direct.tensors().values()))
    assert padded.cu_seqlens_q.tolist() == [0, 5, 7, 7]
    again = padded.pad_to(12, 4)  # padding a padded batch keeps its padding inert
    assert again.cu_seqlens_q.tolist() == [0, 5, 7, 7, 7] and again.slot_mapping.tolist()[7:] == [-1] * 5
    dec = plan_decode([SeqChunk([2, 5], 4, 1)], page_size=4, max_pages=2)
    assert dec.pad_to(4, 4).bucket == Bucket(True, 4, 4, 2)
    with pytest.raises(ValueError, match="one token per sequence"):
        dec.pad_to(4, 2)
    with pytest.raises(ValueError, match="padding only grows a batch"):
        exact.pad_to(6, 3)
    assert pad_input_ids(torch.tensor([5, 6]), 4).tolist() == [5, 6, 0, 0]
    with pytest.raises(ValueError, match="3 tokens do not fit a bucket of 2"):
        pad_input_ids(torch.tensor([1, 2, 3]), 2)


# -- forward on the CPU: eager, counted, warned once ------------------------------------------


def test_forward_without_gpu_runs_eagerly_counts_and_warns_once():
    runner, reference = make_runner(), make_runner()
    forget_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner.reserve([("a", PROMPT), ("b", OTHER)])
        got = runner.forward(*runner.plan_prefill([("a", PROMPT), ("b", OTHER)]), Placement(SPLIT, "prefill"))
        torch.testing.assert_close(got, reference.prefill([("a", PROMPT), ("b", OTHER)]), rtol=0, atol=0)
        for token in (5, 17):
            runner.reserve([("a", [token]), ("b", [token])])
            got = runner.forward(*runner.plan_decode(["a", "b"], [token, token]))
            torch.testing.assert_close(got, reference.decode(["a", "b"], [token, token]), rtol=0, atol=0)
    assert runner.stats == {"graph_steps": 0, "eager_steps": 3, "eager_reasons": {"no GPU": 3}}
    said = [str(w.message) for w in caught if "eagerly" in str(w.message)]
    assert said == ["bullet_kernels engine: running steps eagerly: no GPU (counted in ModelRunner.stats)"]


def test_prepared_prefill_runs_group_by_group_with_placements_per_group():
    runner, reference = make_runner(layer_groups=2), make_runner()
    requests = [("a", PROMPT)]
    runner.reserve(requests)
    step = runner.prepare(*runner.plan_prefill(requests), [Placement(SPLIT, "prefill"), WHOLE_GPU])
    assert isinstance(step, EagerStep) and step.eager_reason == "no GPU"
    assert (step.phase, step.num_groups, step.rows) == ("prefill", 2, 1)
    with pytest.raises(RuntimeError, match="layer group 1 launched before group 0"):
        step.launch_group(1)
    hidden = step.launch_group(0)
    assert hidden.shape == (len(PROMPT), runner.model.config.hidden_size)
    torch.testing.assert_close(step.launch_group(1), reference.prefill(requests), rtol=0, atol=0)
    with pytest.raises(IndexError, match="layer group 2 of a prefill step with 2 group"):
        step.launch_group(2)


def test_placements_that_do_not_match_the_step_are_refused():
    runner = make_runner(layer_groups=2)
    runner.reserve([("a", PROMPT)])
    ids, batch = runner.plan_prefill([("a", PROMPT)])
    with pytest.raises(ValueError, match="a prefill step takes one Placement or a list of 2 \\(one per layer group\\)"):
        runner.prepare(ids, batch, [WHOLE_GPU])
    with pytest.raises(ValueError, match="a prefill step takes one Placement"):
        runner.prepare(ids, batch, (SPLIT, "prefill"))
    runner.reserve([("a", [1])])
    with pytest.raises(ValueError, match="a decode step takes one Placement, got"):
        runner.prepare(*runner.plan_decode(["a"], [1]), [WHOLE_GPU])
    assert runner.stats["eager_steps"] == 0  # refused steps are not counted


def test_capture_and_graphs_need_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU error")
    runner = make_runner()
    with pytest.raises(CaptureError, match="CUDA graphs need a GPU"):
        runner.capture(WHOLE_GPU)
    assert runner.release_graphs() == 0


# -- KV sizing -----------------------------------------------------------------------------


def test_kv_cache_sized_from_a_budget_or_pages_or_the_cpu_default():
    per_page = kv_bytes_per_page(2, 2, 16, 4, torch.float32)  # tiny-llama3: 2 layers, 2 KV heads of 16
    runner = make_runner(kv_num_pages=None, kv_budget_bytes=5 * per_page + 7)
    assert runner.kv_cache.num_pages == 5 and runner.kv_sizing.bytes_per_page == per_page
    assert runner.kv_sizing.rule == f"kv_budget_bytes={5 * per_page + 7}"
    assert runner.kv_cache.k_caches[0].shape == (5, 4, 2, 16) and runner.kv_cache.k_caches[0].dtype == torch.float32
    assert make_runner(kv_num_pages=9).kv_cache.num_pages == 9
    default = make_runner(kv_num_pages=None, max_context=100)
    assert default.max_pages == 25 and default.kv_cache.num_pages == 8 * 25  # prefill_max_seqs full contexts
    with pytest.raises(ValueError, match="holds no page of"):
        make_runner(kv_num_pages=None, kv_budget_bytes=per_page - 1)


def test_cpu_default_is_capped_and_the_capture_reserve_grows_with_the_buckets():
    config = preset_config("llama-3.1-8b")  # 2 MiB per page of 16 tokens in bf16
    sizing = size_kv_cache(config, EngineConfig(), torch.bfloat16, torch.device("cpu"), max_pages=8192)
    assert sizing.num_pages == 128 and sizing.bytes_per_page == 2 << 20
    small = capture_reserve_bytes(config, EngineConfig(prefill_buckets=(512,)), torch.bfloat16, 256)
    large = capture_reserve_bytes(config, EngineConfig(prefill_buckets=(512, 8192)), torch.bfloat16, 256)
    assert 0 < small < large


def test_randomize_fills_every_page_reproducibly_and_keeps_accounting():
    def cache():
        c = PagedKVCache(num_layers=2, num_kv_heads=2, head_dim=8, num_pages=64, page_size=4, dtype=torch.float32)
        c.allocate("a", 5)
        return c

    a, b, c = cache().randomize_(std=0.5, seed=1), cache().randomize_(std=0.5, seed=1), cache().randomize_(seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.k_caches + a.v_caches, b.k_caches + b.v_caches))
    assert not torch.equal(a.k_caches[0], c.k_caches[0])
    values = torch.stack(a.k_caches + a.v_caches)
    assert (values != 0).float().mean() > 0.99 and 0.45 < values.std().item() < 0.55
    assert a.pages("a") == (0, 1) and a.num_free_pages == 62
    with pytest.raises(ValueError, match="std must be >= 0"):
        a.randomize_(std=-1.0)


@pytest.mark.gpu
def test_gpu_kv_cache_takes_the_free_memory_left_after_weights_and_the_capture_reserve():
    model = random_model("smollm2-135m", device="cuda", dtype=torch.bfloat16, max_context=2048)
    cfg = EngineConfig(gpu_memory_fraction=0.5, decode_buckets=(1, 8), prefill_buckets=(512,))
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    usable = free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    runner = ModelRunner(model, cfg)
    reserve = capture_reserve_bytes(model.config, cfg, torch.bfloat16, runner.max_pages)
    per_page = runner.kv_sizing.bytes_per_page
    expected = (int(usable * 0.5) - reserve) // per_page
    # other processes may allocate between the two readings: allow 1% of the pages
    assert abs(runner.kv_cache.num_pages - expected) <= expected // 100 + 1
    assert "capture reserve" in runner.kv_sizing.rule
