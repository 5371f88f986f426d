"""Mixed steps (chunked prefill, Sarathi-style): prefill chunks fused with decode tokens in one
forward over the prefill path must equal running them separately."""

from __future__ import annotations

import pytest
import torch

from bullet_kernels.config import EngineConfig
from bullet_kernels.engine import ModelRunner
from bullet_kernels.models import random_model

PROMPT_A = [(7 * i + 3) % 256 for i in range(7)]
PROMPT_B = [(5 * i + 1) % 256 for i in range(11)]
TOKEN_A = 42  # A's next token, decoded after its prompt
CLOSE = dict(rtol=1e-4, atol=1e-4)


def make_runner() -> ModelRunner:
    model = random_model("tiny-llama3", seed=0, dtype=torch.float32)
    return ModelRunner(model, EngineConfig(kv_num_pages=64, page_size=4))


def run(runner: ModelRunner, ids: torch.Tensor, batch) -> torch.Tensor:
    return runner.run(ids.to(runner.device), batch.to(runner.device))


def cached_kv(runner: ModelRunner, request_id) -> torch.Tensor:
    """The request's K and V of every layer, in token order: ``[2, layers, tokens, heads, dim]``."""
    cache, n = runner.kv_cache, runner.kv_cache.num_tokens(request_id)
    pages = list(cache.pages(request_id))

    def gather(c):
        return c[pages].reshape(-1, *c.shape[2:])[:n]

    return torch.stack([torch.stack([gather(c) for c in caches]) for caches in (cache.k_caches, cache.v_caches)])


def start(runner: ModelRunner) -> None:
    """A prefilled (now decoding) and the first chunk of B, each in its own prefill step."""
    for request in (("a", PROMPT_A), ("b", PROMPT_B[:5])):
        runner.reserve([request])
        run(runner, *runner.plan_prefill([request]))


@pytest.mark.filterwarnings("ignore:bullet_kernels engine. running steps eagerly")
def test_mixed_step_equals_prefill_chunk_then_decode():
    sequential, fused = make_runner(), make_runner()
    for runner in (sequential, fused):
        start(runner)

    # (a) B's second chunk alone, then A's decode token alone
    sequential.reserve([("b", PROMPT_B[5:])])
    want_b = run(sequential, *sequential.plan_prefill([("b", PROMPT_B[5:])]))[0]
    sequential.reserve([("a", [TOKEN_A])])
    want_a = run(sequential, *sequential.plan_decode(["a"], [TOKEN_A]))[0]

    # (b) both in one prefill-path forward: B's chunk first, then A's token
    fused.reserve([("b", PROMPT_B[5:]), ("a", [TOKEN_A])])
    ids, batch = fused.plan_mixed([("b", PROMPT_B[5:])], ["a"], [TOKEN_A])
    assert not batch.is_decode and batch.bucket.num_tokens == 7 and batch.bucket.batch_size == 2
    assert ids.tolist() == PROMPT_B[5:] + [TOKEN_A]
    assert batch.cu_seqlens_q.tolist() == [0, 6, 7] and batch.logits_indices.tolist() == [5, 6]
    assert batch.seq_lens.tolist() == [11, 8] and batch.positions.tolist() == [5, 6, 7, 8, 9, 10, 7]
    step = fused.prepare(ids, batch)
    assert step.phase == "prefill" and step.rows == 2
    got = step.launch()[: step.rows]

    assert got.shape == (2, fused.model.config.vocab_size)
    # the two rows differ by far more than the tolerance, so swapped rows would fail below
    assert (want_a - want_b).abs().max() > 100 * CLOSE["atol"]
    torch.testing.assert_close(got[0], want_b, **CLOSE)
    torch.testing.assert_close(got[1], want_a, **CLOSE)
    for request_id, tokens in (("a", 8), ("b", 11)):
        kv = cached_kv(fused, request_id)
        assert kv.shape[2] == tokens and kv.abs().amax() > 0
        torch.testing.assert_close(kv, cached_kv(sequential, request_id), **CLOSE)

    # and the next step of both, now both decoding, agrees too (reads the KV the mixed step wrote)
    for runner in (sequential, fused):
        runner.reserve([("a", [7]), ("b", [9])])
    torch.testing.assert_close(
        run(fused, *fused.plan_mixed([], ["a", "b"], [7, 9])),
        run(sequential, *sequential.plan_decode(["a", "b"], [7, 9])),
        **CLOSE,
    )


def test_mixed_step_with_several_prefills_and_decodes_keeps_row_order():
    reference, fused = make_runner(), make_runner()
    long_prompt = [(3 * i + 2) % 256 for i in range(40)]  # a 1-token sequence over 40 cached tokens
    for runner in (reference, fused):
        runner.prefill([("a", PROMPT_A), ("long", long_prompt)])
        runner.prefill([("b", PROMPT_B[:5])])
    prefill = [("c", [11, 12, 13]), ("b", PROMPT_B[5:])]
    reference.reserve(prefill)
    want_prefill = run(reference, *reference.plan_prefill(prefill))
    reference.reserve([("long", [5]), ("a", [6])])
    want_decode = run(reference, *reference.plan_decode(["long", "a"], [5, 6]))
    fused.reserve(prefill + [("long", [5]), ("a", [6])])
    got = run(fused, *fused.plan_mixed(prefill, ["long", "a"], [5, 6]))
    torch.testing.assert_close(got, torch.cat([want_prefill, want_decode]), **CLOSE)
    for request_id in ("a", "b", "c", "long"):
        torch.testing.assert_close(cached_kv(fused, request_id), cached_kv(reference, request_id), **CLOSE)


def test_mixed_step_refusals():
    runner = make_runner()
    runner.prefill([("a", PROMPT_A), ("b", PROMPT_B)])
    runner.reserve([("a", [1]), ("b", [2])])
    with pytest.raises(ValueError, match="2 decode requests but 1 tokens"):
        runner.plan_mixed([], ["a", "b"], [1])
    with pytest.raises(ValueError, match="at least one sequence"):
        runner.plan_mixed([], [], [])
    with pytest.raises(ValueError, match="request\\(s\\) 'a' appear more than once in one mixed step"):
        runner.plan_mixed([], ["a", "a"], [1, 1])
    with pytest.raises(ValueError, match="request\\(s\\) 'b' appear more than once"):
        runner.plan_mixed([("b", [2])], ["b"], [2])
    with pytest.raises(ValueError, match="'c' has 0 reserved slots for 3 new tokens: call reserve\\(\\) first"):
        runner.plan_mixed([("c", [1, 2, 3])], ["a"], [1])
    with pytest.raises(ValueError, match="call reserve\\(\\) first"):
        runner.plan_mixed([], ["a", "z"], [1, 2])
