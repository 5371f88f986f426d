"""Model graphs replayed through the runner under every SM split give the eager logits (GPU)."""

import contextlib
import dataclasses

import pytest
import torch

from bullet_kernels.config import EngineConfig
from bullet_kernels.engine import WHOLE_GPU, ModelRunner, Placement, layer_groups
from bullet_kernels.kernels.sizing import sm_budget
from bullet_kernels.models.presets import random_model
from bullet_kernels.partition import Partitioner, SMSplit

# bf16 weights and activations. Each lane's graphs are compared with an eager run on the same
# lane; the mixed-split prefill with the eager full-GPU run, whose sums happen in another order.
REL_TOL = 1e-2
# A decode step's logits differ from another run's by about 1.1% in this random 30-layer bf16 model
# whatever runs them: on the H200 at e48b00f an eager decode was 1.12% from an eager prefill of the
# same whole sequences, the graph 1.15% from it and 1.16% from the eager decode
# (bench/investigations/decode_graph_reference.py); prefill graphs matched eager bit for bit.
DECODE_REL_TOL = 2e-2
CFG = EngineConfig(page_size=16, decode_buckets=(8,), prefill_buckets=(512,), prefill_max_seqs=4,
                   layer_groups=3, kv_num_pages=512, max_context=1024)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_layer_groups_cover_every_layer_once():
    assert layer_groups(32, 4) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert layer_groups(30, 4) == [(0, 8), (8, 15), (15, 22), (22, 30)]
    with pytest.raises(ValueError, match="1..32"):
        layer_groups(32, 0)


@contextlib.contextmanager
def on(parts, placement):
    """Eager work on a placement's lane, as the graphs of that lane were captured."""
    if placement.split is None:
        yield
        return
    pset = parts.get(placement.split)
    with pset.use(placement.lane), sm_budget(pset.lane(placement.lane).granted):
        yield


def plan(runner, prompts, decode_tokens):
    """Reserve and plan one prefill of ``prompts`` and one decode step after it (exact batches)."""
    runner.reserve(list(prompts.items()))
    prefill = runner.plan_prefill(list(prompts.items()))
    runner.reserve([(r, [t]) for r, t in zip(prompts, decode_tokens)])
    return prefill, runner.plan_decode(list(prompts), decode_tokens)


def eager(runner, step):
    ids, batch = step
    with torch.no_grad():
        return runner.run(ids.cuda(), batch.to("cuda"))


@pytest.mark.gpu
def test_graph_replay_under_every_split_matches_eager():
    torch.manual_seed(0)
    model = random_model("smollm2-135m", device="cuda", dtype=torch.bfloat16, max_context=1024)
    vocab = model.config.vocab_size
    prompts = {r: torch.randint(0, vocab, (n,)).tolist() for r, n in (("a", 300), ("b", 77))}
    decode_tokens = torch.randint(0, vocab, (2,)).tolist()
    big, small = SMSplit(prefill=96, decode=36), SMSplit(prefill=104, decode=28)
    placements = [Placement(big, "prefill"), Placement(big, "decode"), Placement(small, "decode"), WHOLE_GPU]
    with Partitioner("green") as parts:
        runner = ModelRunner(model, CFG, parts)
        pre, dec = plan(runner, prompts, decode_tokens)
        ref_pre, ref_dec = eager(runner, pre), eager(runner, dec)
        for placement in placements:
            runner.capture(placement)
        other = torch.cuda.Stream()
        errors, argmax_differs = {}, []
        for placement in placements:
            # Each graph against an eager run on its lane (the same SMs and split-KV counts) that
            # reads the same KV cache (written by the graph prefill just before). The decode
            # graph runs the 8-row bucket where eager runs the 2 rows (other GEMM shapes): 1.16%
            # apart on every placement at e48b00f, as far as either is from an eager prefill of
            # the whole sequences (DECODE_REL_TOL). Comparing with an eager run padded to the
            # bucket would allow a tighter bound: a follow-up.
            with on(parts, placement):
                lane_pre = eager(runner, pre)
            out = runner.forward(*pre, placement, stream=other)
            other.synchronize()
            assert out.shape[0] == 2
            errors[f"{placement} prefill"] = rel_err(out, lane_pre)
            with on(parts, placement):
                lane_dec = eager(runner, dec)
            out = runner.forward(*dec, placement, stream=other)
            other.synchronize()
            assert out.shape[0] == 2
            errors[f"{placement} decode"] = rel_err(out, lane_dec)
            if not torch.equal(out.argmax(-1), lane_dec.argmax(-1)):
                argmax_differs.append(str(placement))
        # every placement's errors in the message, to see how near the others were
        assert all(e < (DECODE_REL_TOL if k.endswith("decode") else REL_TOL) for k, e in errors.items()), errors
        assert not argmax_differs, (argmax_differs, errors)
        assert runner.stats == {"graph_steps": 2 * len(placements), "eager_steps": 0, "eager_reasons": {}}

        # the split may change between layer groups of one prefill
        mixed = [Placement(big, "prefill"), WHOLE_GPU, Placement(big, "decode")]
        step = runner.prepare(*pre, mixed)
        assert step.num_groups == 3 and step.rows == 2
        out = step.launch(other)
        other.synchronize()
        assert rel_err(out[:2], ref_pre) < REL_TOL

        # a placement nothing was captured for runs eagerly on its lane, counted with the reason
        uncaptured = Placement(small, "prefill")
        with on(parts, uncaptured):
            lane_dec = eager(runner, dec)
        out = runner.forward(*dec, uncaptured)
        torch.cuda.synchronize()
        assert rel_err(out, lane_dec) < REL_TOL
        reason = f"no decode graph captured for {uncaptured} (lazy_capture is off)"
        assert runner.stats["eager_steps"] == 1 and runner.stats["eager_reasons"] == {reason: 1}
        runner.close()

        # lazy: nothing captured up front; the first replay captures exactly the graph it needs
        lazy = ModelRunner(model, dataclasses.replace(CFG, lazy_capture=True), parts)  # its own KV
        pre, dec = plan(lazy, prompts, decode_tokens)
        where = Placement(small, "decode")
        with on(parts, where):  # eager on the same lane fills the KV and gives the reference
            eager(lazy, pre)
            ref_dec = eager(lazy, dec)
        out = lazy.forward(*dec, where, stream=other)
        other.synchronize()
        assert rel_err(out, ref_dec) < DECODE_REL_TOL and len(lazy.graphs.bank) == 1
        assert lazy.stats["graph_steps"] == 1 and lazy.stats["eager_steps"] == 0
        lazy.close()
