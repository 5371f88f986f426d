"""Runner and batch planning: chunked prefill, padding, copy_into, context and KV limits."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from bullet_kernels.config import EngineConfig
from bullet_kernels.engine import (
    Bucket, ContextTooLong, ForwardBatch, KVCacheExhausted, ModelRunner, SeqChunk, pad_input_ids, plan_decode,
    plan_prefill,
)
from bullet_kernels.models import random_model

PROMPT = [(7 * i + 3) % 256 for i in range(23)]
OTHER = [(5 * i + 1) % 256 for i in range(9)]


def make_runner(preset="tiny-llama3", num_pages=64, page_size=4, max_context=None) -> ModelRunner:
    model = random_model(preset, seed=0, dtype=torch.float32)
    return ModelRunner(model, EngineConfig(kv_num_pages=num_pages, page_size=page_size, max_context=max_context))


# -- planning ------------------------------------------------------------------------------


def test_plan_prefill_continues_a_cached_prefix_and_pads_to_the_bucket():
    chunks = [SeqChunk(pages=[3, 7], num_cached=2, num_new=5), SeqChunk(pages=[1], num_cached=0, num_new=2)]
    batch = plan_prefill(chunks, page_size=4, max_pages=3, num_tokens=10, batch_size=3)
    assert batch.bucket == Bucket(False, 10, 3, 3)
    assert batch.positions.tolist() == [2, 3, 4, 5, 6, 0, 1, 0, 0, 0]
    assert batch.slot_mapping.tolist() == [14, 15, 28, 29, 30, 4, 5, -1, -1, -1]
    # Only the columns in use are planned; the bucket keeps its width (3 pages).
    assert batch.page_table.tolist() == [[3, 7], [1, 0], [0, 0]] and batch.max_pages == 3
    assert batch.seq_lens.tolist() == [7, 2, 0]
    assert batch.cu_seqlens_q.tolist() == [0, 5, 7, 7]
    assert batch.logits_indices.tolist() == [4, 6, 0]
    assert batch.page_table.dtype == batch.seq_lens.dtype == batch.cu_seqlens_q.dtype == torch.int32


def test_plan_decode_pads_with_inert_rows():
    batch = plan_decode([SeqChunk([2, 5], 4, 1)], page_size=4, max_pages=2, batch_size=2)
    assert batch.is_decode and batch.bucket == Bucket(True, 2, 2, 2)
    assert batch.positions.tolist() == [4, 0] and batch.slot_mapping.tolist() == [20, -1]
    assert batch.seq_lens.tolist() == [5, 0] and batch.logits_indices.tolist() == [0, 0]


def test_plan_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="do not fit the bucket"):
        plan_prefill([SeqChunk([0, 1], 0, 6)], page_size=4, max_pages=2, num_tokens=4)
    with pytest.raises(ValueError, match="1 pages of 4 for 6 tokens"):
        plan_prefill([SeqChunk([0], 0, 6)], page_size=4, max_pages=2)
    with pytest.raises(ValueError, match="one new token per sequence"):
        plan_decode([SeqChunk([0], 0, 2)], page_size=4, max_pages=2)


def test_copy_into_fills_static_buffers_of_the_same_bucket_only():
    batch = plan_prefill([SeqChunk([3, 7], 2, 5)], page_size=4, max_pages=3, num_tokens=8, batch_size=2)
    static = ForwardBatch.padding(batch.bucket)
    static.page_table.fill_(9)  # an earlier step's pages
    batch.copy_into(static)
    for name, value in batch.tensors().items():
        target = static.page_table[:, :2] if name == "page_table" else getattr(static, name)
        assert torch.equal(target, value), name
    assert static.page_table[:, 2].tolist() == [9, 9]  # columns past every sequence's pages: never read, not copied
    with pytest.raises(ValueError, match="cannot copy a batch of bucket"):
        batch.copy_into(ForwardBatch.padding(Bucket(False, 16, 2, 3)))
    with pytest.raises(ValueError, match="wider than the bucket"):
        ForwardBatch(**batch.tensors(), is_decode=False, max_pages=1)


# -- runner --------------------------------------------------------------------------------


def test_chunked_prefill_equals_one_shot():
    one_shot, chunked = make_runner(), make_runner()
    expected = one_shot.prefill([("a", PROMPT), ("b", OTHER)])
    chunked.prefill([("a", PROMPT[:10])])
    got = chunked.prefill([("b", OTHER), ("a", PROMPT[10:])])  # a continues from its cache
    assert rel_err(got[1], expected[0]) < 1e-5 and rel_err(got[0], expected[1]) < 1e-5
    for token in (5, 17, 99):
        assert rel_err(chunked.decode(["a", "b"], [token, token]), one_shot.decode(["a", "b"], [token, token])) < 1e-5


def test_padding_rows_do_not_change_real_rows():
    exact, padded = make_runner("tiny-qwen3"), make_runner("tiny-qwen3")
    requests = [("a", PROMPT), ("b", OTHER)]
    for runner in (exact, padded):
        runner.reserve(requests)
    want = exact.run(*exact.plan_prefill(requests))
    ids, batch = padded.plan_prefill(requests)
    got = padded.run(pad_input_ids(ids, 48), batch.pad_to(48, 4))
    assert got.shape[0] == 4 and rel_err(got[:2], want) < 1e-6
    for runner in (exact, padded):
        runner.reserve([("a", [1]), ("b", [2])])
    want = exact.run(*exact.plan_decode(["a", "b"], [1, 2]))
    ids, batch = padded.plan_decode(["a", "b"], [1, 2])
    got = padded.run(pad_input_ids(ids, 8), batch.pad_to(8, 8))
    assert got.shape[0] == 8 and rel_err(got[:2], want) < 1e-6
    # padding wrote no KV: pages nobody owns are still zero
    owned = set(padded.kv_cache.pages("a") + padded.kv_cache.pages("b"))
    unowned = [p for p in range(padded.kv_cache.num_pages) if p not in owned]
    assert not any(k[unowned].any() for k in padded.kv_cache.k_caches + padded.kv_cache.v_caches)


def test_generate_is_greedy_prefill_then_decode():
    runner = make_runner("tiny-tied")
    out = runner.generate([PROMPT, OTHER], max_new_tokens=5)
    logits = runner.prefill([("a", PROMPT), ("b", OTHER)])
    manual = [[t] for t in logits.argmax(-1).tolist()]
    for _ in range(4):
        for seq, t in zip(manual, runner.decode(["a", "b"], [s[-1] for s in manual]).argmax(-1).tolist()):
            seq.append(t)
    assert out == manual
    stop = manual[0][1]
    stopped = runner.generate([PROMPT], max_new_tokens=5, stop_token_ids=[stop])
    assert stopped == [manual[0][: manual[0].index(stop) + 1]]  # the stop token is kept
    assert runner.kv_cache.num_free_pages == 64 - len(runner.kv_cache.pages("a") + runner.kv_cache.pages("b"))


def test_prompt_longer_than_context_is_refused_before_allocating():
    runner = make_runner(max_context=32)
    with pytest.raises(ContextTooLong) as e:
        runner.prefill([("ok", OTHER), ("long", list(range(33)))])
    assert "'long' needs 33 tokens of context (0 cached + 33 new) but max_context is 32" in str(e.value)
    assert runner.kv_cache.num_free_pages == 64 and "ok" not in runner.kv_cache
    runner.prefill([("a", list(range(31)))])
    runner.decode(["a"], [1])  # the 32nd token fits
    with pytest.raises(ContextTooLong, match="needs 33 tokens of context \\(32 cached \\+ 1 new\\)"):
        runner.decode(["a"], [2])
    assert runner.kv_cache.num_tokens("a") == 32


def test_kv_exhaustion_in_a_batch_allocates_nothing():
    runner = make_runner(num_pages=8, page_size=4)
    runner.prefill([("a", PROMPT)])  # 6 pages
    with pytest.raises(KVCacheExhausted, match="4 pages requested .* only 2 of 8 pages are free"):
        runner.prefill([("b", [1, 2, 3]), ("c", OTHER)])
    assert "b" not in runner.kv_cache and runner.kv_cache.num_free_pages == 2


def test_bad_inputs_are_named():
    runner = make_runner()
    with pytest.raises(ValueError, match="token ids \\[256\\] outside vocab 0..255"):
        runner.prefill([("a", [1, 256])])
    with pytest.raises(ValueError, match="call reserve\\(\\) first"):
        runner.plan_prefill([("a", [1, 2])])
    with pytest.raises(ValueError, match="max_context 9999 must be in 1..512"):
        ModelRunner(runner.model, EngineConfig(kv_num_pages=64, max_context=9999))


@pytest.mark.gpu
def test_llama31_8b_random_bf16_on_gpu_is_finite_and_close_to_fp32():
    device = "cuda"
    logits = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = random_model("llama-3.1-8b", seed=0, dtype=dtype, device=device, max_context=1024)
        runner = ModelRunner(model, EngineConfig(kv_num_pages=64))
        prefill = runner.prefill([("a", list(range(100, 400))), ("b", list(range(5000, 5070)))])
        logits[dtype] = torch.cat([prefill, runner.decode(["a", "b"], [11, 12])])
        del model, runner
        torch.cuda.empty_cache()
    assert torch.isfinite(logits[torch.bfloat16]).all()
    # 32 layers of bf16 rounding on near-uniform random logits: 0.07 on H100; a blow-up is >> 1
    assert rel_err(logits[torch.bfloat16], logits[torch.float32]) < 0.15


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny-qwen3", "smollm2-135m"])
def test_cuda_graph_replay_matches_eager_reference_kernels(preset, monkeypatch):
    model = random_model(preset, seed=0, dtype=torch.bfloat16, device="cuda", max_context=256)
    runner = ModelRunner(model, EngineConfig(kv_num_pages=64))
    requests = [("a", list(range(1, 40))), ("b", list(range(50, 57)))]
    runner.reserve(requests)
    ids, batch = runner.plan_prefill(requests)
    steps = [(pad_input_ids(ids, 64), batch.pad_to(64, 4))]
    runner.reserve([("a", [7]), ("b", [8])])
    ids, batch = runner.plan_decode(["a", "b"], [7, 8])
    steps.append((pad_input_ids(ids, 4), batch.pad_to(4, 4)))
    for input_ids, batch in steps:  # prefill, then decode on the prefill's KV
        static_ids, static = input_ids.cuda(), ForwardBatch.padding(batch.bucket, "cuda")
        batch.copy_into(static)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles outside the capture
            runner.run(static_ids, static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = runner.run(static_ids, static)
        graph.replay()
        torch.cuda.synchronize()
        monkeypatch.setenv("BULLET_KERNELS", "reference")
        expected = runner.run(input_ids.cuda(), batch.to("cuda"))
        monkeypatch.delenv("BULLET_KERNELS")
        assert rel_err(logits[:2], expected[:2]) < 3e-2
