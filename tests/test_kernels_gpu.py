"""Triton kernels on the GPU at Llama-3.1-8B sizes, against the fp32 reference.

Same checks as test_kernels.py (NaN-poisoned outputs, rel-norm error bf16 < 1e-2, fp32 < 1e-4)
plus what only a GPU shows: bit-exact bf16 rounding of the residual, CUDA-graph capture and
replay with new lengths, grids sized by sm_budget, and the dispatcher picking our kernels.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted"),
]

from bullet_kernels import kernels as K  # noqa: E402
from bullet_kernels.kernels import (  # noqa: E402
    activation,
    decode_attention,
    gemm,
    norm,
    prefill_attention,
    reference as R,
    rotary,
    sizing,
)

DEV = "cuda"
BF16 = torch.bfloat16


def rel_err(out, ref):
    assert not out.isnan().any(), "kernel left NaN (unwritten) elements"
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def nan_like(t):
    return torch.full_like(t, float("nan"))


def make_paged(lens, page_size, hkv, d, dtype, extra_cols=2, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    need = [-(-n // page_size) for n in lens]
    pages = sum(need) + 4
    kc = torch.randn(pages, page_size, hkv, d, device=DEV, generator=g).to(dtype)
    vc = torch.randn(pages, page_size, hkv, d, device=DEV, generator=g).to(dtype)
    width = max(need) + extra_cols
    table = torch.randint(0, pages, (len(lens), width), device=DEV, generator=g, dtype=torch.int32)
    perm = torch.randperm(pages, device=DEV, generator=g).int()
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[used : used + n]
        used += n
    return kc, vc, table, torch.tensor(lens, dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("hq,hkv", [(32, 8), (32, 32), (32, 4)])
@pytest.mark.parametrize("budget", [16, 132])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_decode_attention_real_sizes(hq, hkv, budget, dtype):
    torch.manual_seed(0)
    lens = [1, 4095, 0, 1000, 17, 2048, 4096, 333] * 2  # 16 rows, padding, not page multiples
    kc, vc, table, seq = make_paged(lens, 16, hkv, 128, dtype)
    q = torch.randn(len(lens), hq, 128, device=DEV).to(dtype)
    with sizing.sm_budget(budget):
        out = decode_attention.paged_decode_attention(q, kc, vc, table, seq, 128**-0.5, out=nan_like(q))
    ref = R.paged_decode_attention(q.float(), kc.float(), vc.float(), table, seq, 128**-0.5)
    assert rel_err(out, ref) < (1e-2 if dtype == BF16 else 1e-4)
    assert torch.all(out[seq == 0] == 0)


@pytest.mark.parametrize("d,page_size", [(64, 8), (128, 64)])
def test_decode_attention_head_dims_and_pages(d, page_size):
    lens = [5, 700, 129]
    kc, vc, table, seq = make_paged(lens, page_size, 2, d, BF16)
    q = torch.randn(3, 8, d, device=DEV).to(BF16)
    out = decode_attention.paged_decode_attention(q, kc, vc, table, seq, d**-0.5, out=nan_like(q), num_splits=4)
    ref = R.paged_decode_attention(q.float(), kc.float(), vc.float(), table, seq, d**-0.5)
    assert rel_err(out, ref) < 1e-2


def test_decode_attention_cuda_graph_replays_new_lengths():
    lens = [300, 2000, 0, 4000]
    kc, vc, table, seq = make_paged(lens, 16, 8, 128, BF16)
    q = torch.randn(4, 32, 128, device=DEV).to(BF16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), sizing.sm_budget(32):
        decode_attention.paged_decode_attention(q, kc, vc, table, seq, 0.1)  # compile outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = decode_attention.paged_decode_attention(q, kc, vc, table, seq, 0.1)
    seq.copy_(torch.tensor([4000, 1, 77, 0], device=DEV))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    ref = R.paged_decode_attention(q.float(), kc.float(), vc.float(), table, seq, 0.1)
    assert rel_err(out, ref) < 1e-2


MERGE_REPEATS = 30  # a race between the last split's merge and another split's partials is intermittent


def llama_decode_batch(batch, ctx, seed=0):
    """Llama-3.1-8B decode attention inputs (8 KV heads, head dim 128, 16-token pages): ragged
    lengths up to ``ctx``, the second row a padding row (length 0) where there is one."""
    lens = [max(1, ctx - (97 * i) % 700) for i in range(batch)]
    if batch > 1:
        lens[1] = 0
    return make_paged(lens, 16, 8, 128, BF16, seed=seed)


def merged_both_ways(q, kc, vc, table, seq, splits, out=None):
    sep = decode_attention.paged_decode_attention(q, kc, vc, table, seq, 128**-0.5, num_splits=splits,
                                                  merge="separate")
    fused = decode_attention.paged_decode_attention(q, kc, vc, table, seq, 128**-0.5, num_splits=splits,
                                                    merge="fused", out=nan_like(q) if out is None else out)
    return sep, fused


@pytest.mark.parametrize("ctx", [1024, 4096])
@pytest.mark.parametrize("batch", [1, 16, 128])
def test_decode_attention_fused_merge_matches_separate(batch, ctx):
    """The fused merge (last program of each KV-head group) against the merge kernel, many times
    with new queries each time: a program that merged before every split's partials were visible
    would read stale ones (the previous repeat's, in the same freed memory) and differ. Split
    counts: the sizing's for 16 and 132 SMs and 4x the latter (short splits, many arrivals)."""
    kc, vc, table, seq = llama_decode_batch(batch, ctx)
    max_ctx = table.shape[1] * 16
    counts = {max(2, sizing.decode_kv_splits(batch, 8, 4, max_ctx, sms=n)) for n in (16, 132)}
    counts.add(min(sizing.MAX_SPLITS, 4 * max(counts)))
    for splits in sorted(counts):
        for rep in range(MERGE_REPEATS):
            q = torch.randn(batch, 32, 128, device=DEV).to(BF16)
            sep, fused = merged_both_ways(q, kc, vc, table, seq, splits)
            # fp32 merges in another order, then one bf16 rounding: equal or one bf16 step apart
            torch.testing.assert_close(fused, sep, msg=lambda m: f"{splits} splits, repeat {rep}: {m}")
        ref = R.paged_decode_attention(q.float(), kc.float(), vc.float(), table, seq, 128**-0.5)
        assert rel_err(fused, ref) < 1e-2
        assert torch.all(fused[seq == 0] == 0)


def test_decode_attention_fused_merge_in_graphs_replayed_on_two_streams_at_once():
    """Two graphs of ten fused calls each (their own counters and partials in each graph's pool),
    replayed at the same time on two streams, five times with new queries; then the same eagerly
    on two streams. Every output must match the separate merge of the same inputs."""
    splits, calls = 8, 10
    problems = [llama_decode_batch(16, 1024, seed=1), llama_decode_batch(128, 4096, seed=2)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    qs = [torch.randn(seq.shape[0], 32, 128, device=DEV).to(BF16) for _, _, _, seq in problems]
    graphs, outs = [], []
    for (kc, vc, table, seq), q, stream in zip(problems, qs, streams):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            decode_attention.paged_decode_attention(q, kc, vc, table, seq, 128**-0.5, num_splits=splits,
                                                    merge="fused")  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                outs.append([decode_attention.paged_decode_attention(q, kc, vc, table, seq, 128**-0.5,
                                                                     num_splits=splits, merge="fused")
                             for _ in range(calls)])
        graphs.append(graph)
    torch.cuda.synchronize()
    for replay in range(5):
        for q in qs:
            q.copy_(torch.randn_like(q))
        for graph, stream, graph_outs in zip(graphs, streams, outs):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for out in graph_outs:
                    out.fill_(float("nan"))  # a call that leaves an element unwritten shows
                graph.replay()
        for stream in streams:
            torch.cuda.current_stream().wait_stream(stream)
        for (kc, vc, table, seq), q, graph_outs in zip(problems, qs, outs):
            sep = decode_attention.paged_decode_attention(q, kc, vc, table, seq, 128**-0.5, num_splits=splits,
                                                          merge="separate")
            for i, out in enumerate(graph_outs):
                torch.testing.assert_close(out, sep, msg=lambda m: f"replay {replay}, call {i}: {m}")
    for rep in range(MERGE_REPEATS):
        for q in qs:
            q.copy_(torch.randn_like(q))
        eager = []
        for (kc, vc, table, seq), q, stream in zip(problems, qs, streams):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                eager.append([decode_attention.paged_decode_attention(q, kc, vc, table, seq, 128**-0.5,
                                                                      num_splits=splits, merge="fused",
                                                                      out=nan_like(q)) for _ in range(3)])
        for stream in streams:
            torch.cuda.current_stream().wait_stream(stream)
        for (kc, vc, table, seq), q, outs_eager in zip(problems, qs, eager):
            sep = decode_attention.paged_decode_attention(q, kc, vc, table, seq, 128**-0.5, num_splits=splits,
                                                          merge="separate")
            for out in outs_eager:
                torch.testing.assert_close(out, sep, msg=lambda m: f"eager repeat {rep}: {m}")


@pytest.mark.parametrize("hq,hkv", [(32, 8), (32, 32), (32, 4)])
def test_prefill_attention_real_sizes_and_graph(hq, hkv):
    q_lens, prefix = [1, 300, 0, 1024, 77], [0, 512, 40, 1000, 3]
    lens = [a + b for a, b in zip(q_lens, prefix)]
    kc, vc, table, seq = make_paged(lens, 16, hkv, 128, BF16)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    T = 1536  # static token bucket; rows past cu[-1] are padding
    q = torch.randn(T, hq, 128, device=DEV).to(BF16)
    out = prefill_attention.paged_prefill_attention(q, kc, vc, table, cu, seq, 128**-0.5, out=nan_like(q))
    ref = R.paged_prefill_attention(q.float(), kc.float(), vc.float(), table, cu, seq, 128**-0.5)
    assert rel_err(out, ref) < 1e-2
    assert torch.all(out[int(cu[-1]):] == 0)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out = prefill_attention.paged_prefill_attention(q, kc, vc, table, cu, seq, 128**-0.5)
    new_q = [200, 0, 1, 500, 60]
    cu.copy_(torch.tensor([0] + torch.tensor(new_q).cumsum(0).tolist(), dtype=torch.int32))
    seq.copy_(torch.tensor([a + b for a, b in zip(new_q, [0, 0, 10, 100, 3])], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    ref = R.paged_prefill_attention(q.float(), kc.float(), vc.float(), table, cu, seq, 128**-0.5)
    assert rel_err(g_out, ref) < 1e-2


def test_norms_activation_rotary_real_sizes():
    x = torch.randn(64, 4096, device=DEV).to(BF16)
    r = torch.randn(64, 4096, device=DEV).to(BF16)
    w = (torch.rand(4096, device=DEV) + 0.5).to(BF16)
    y, s = norm.fused_add_rms_norm(x, r, w, 1e-5, out=nan_like(x), residual_out=nan_like(x))
    y_ref, s_ref = R.fused_add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(s, s_ref)  # rounded to bf16 once, to nearest, as the reference
    assert rel_err(y, y_ref) < 1e-2
    assert rel_err(norm.rms_norm(x, w, 1e-5, out=nan_like(x)), R.rms_norm(x, w, 1e-5)) < 1e-2

    gu = torch.randn(64, 2 * 14336, device=DEV).to(BF16)
    assert rel_err(activation.silu_and_mul(gu, out=nan_like(gu[:, :14336])), R.silu_and_mul(gu.float())) < 1e-2

    T, page_size = 64, 16
    inv = 1.0 / (500000 ** (torch.arange(0, 128, 2, device=DEV).float() / 128))
    f = torch.arange(8192, device=DEV).float()[:, None] * inv[None]
    cs = torch.cat([f.cos(), f.sin()], -1)
    qkv = torch.randn(T, 48 * 128, device=DEV).to(BF16)  # q, k, v as strided views of one GEMM output
    q, k, v = qkv.view(T, 48, 128).split([32, 8, 8], dim=1)
    pos = torch.randint(0, 8192, (T,), device=DEV)
    slots = torch.randperm(64 * page_size, device=DEV)[:T]
    slots[::7] = -1
    kc = torch.zeros(64, page_size, 8, 128, device=DEV, dtype=BF16)
    vc = torch.zeros_like(kc)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_rot, k_rot = rotary.rotary_and_store_kv(q, k, v, pos, cs, kc, vc, slots, q_out=nan_like(q), k_out=nan_like(k))
    q_ref, k_ref = R.rotary_and_store_kv(q, k, v, pos, cs, kc_ref, vc_ref, slots)
    assert rel_err(q_rot, q_ref) < 1e-2 and rel_err(k_rot, k_ref) < 1e-2
    assert rel_err(kc, kc_ref) < 1e-2 and torch.equal(vc, vc_ref)


@pytest.mark.parametrize("m", [1, 16, 64, 256])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336)])
@pytest.mark.parametrize("budget", [16, 132])
def test_splitk_linear_real_sizes(m, n, k, budget):
    x = torch.randn(m, k, device=DEV).to(BF16)
    w = (torch.randn(n, k, device=DEV) / k**0.5).to(BF16)
    with sizing.sm_budget(budget):
        y = gemm.linear(x, w)
    assert rel_err(y, x.float() @ w.float().T) < 1e-2


def test_dispatcher_routes_cuda_to_triton(monkeypatch):
    lens = [100, 0]
    kc, vc, table, seq = make_paged(lens, 16, 8, 128, BF16)
    q = torch.randn(2, 32, 128, device=DEV).to(BF16)
    ours = decode_attention.paged_decode_attention(q, kc, vc, table, seq, 0.1)
    assert torch.equal(K.paged_decode_attention(q, kc, vc, table, seq, 0.1), ours)
    monkeypatch.setenv("BULLET_KERNELS", "reference")
    assert rel_err(K.paged_decode_attention(q, kc, vc, table, seq, 0.1), ours) < 1e-2
    x, w = torch.randn(4, 256, device=DEV).to(BF16), torch.randn(512, 256, device=DEV).to(BF16)
    assert torch.equal(K.linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("budget", [40, 132])
def test_cublaslt_sm_target_is_set_inside_and_restored_after(monkeypatch, budget):
    from bullet_kernels.kernels import blas_target

    total = sizing.device_sm_count()
    before = (torch.backends.cuda.preferred_blas_library(), torch._C._get_sm_carveout_experimental())
    x = torch.randn(64, 4096, device=DEV).to(BF16)
    w = (torch.randn(6144, 4096, device=DEV) / 64).to(BF16)
    monkeypatch.setenv("BULLET_LINEAR", "cublaslt-target")
    seen = {}
    real = F.linear

    def spy(*args):  # what torch sees when the dispatcher calls it
        seen["carveout"] = torch._C._get_sm_carveout_experimental()
        seen["library"] = str(torch.backends.cuda.preferred_blas_library())
        return real(*args)

    monkeypatch.setattr(K.F, "linear", spy)
    with sizing.sm_budget(budget):
        y = K.linear(x, w)
    assert seen["carveout"] == (None if budget == total else total - budget)
    assert "Cublaslt" in seen["library"] or "cublaslt" in seen["library"].lower()
    assert (torch.backends.cuda.preferred_blas_library(), torch._C._get_sm_carveout_experimental()) == before
    assert rel_err(y, x.float() @ w.float().T) < 1e-2
