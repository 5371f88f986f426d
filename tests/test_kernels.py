"""Triton kernels against the fp32 reference, on CPU through Triton's interpreter.

Outputs are poisoned with NaN before each run, so an element a kernel forgets to write fails.
Tolerances (relative Frobenius error vs the fp32 reference fed the same rounded inputs):
bf16/fp16 < 1e-2 (output rounding alone is ~3e-3), fp32 < 1e-4 (the interpreter's fp32 dots
are exact fp32; the GPU path asks for IEEE fp32, not TF32). The interpreter rounds fp32 -> bf16
by truncation where the GPU rounds to nearest, so bit-exact checks of bf16 outputs live in
test_kernels_gpu.py. Shapes are tiny: this runs on a 2-core CI machine.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

# Triton picks interpreter-or-GPU when a function is decorated, its own tl helpers included,
# i.e. when triton is first imported. So the interpreter runs in this process only if we get
# to switch it on first; otherwise (triton already imported, or a GPU machine whose GPU tests
# need compiled kernels in this same session) the tests below run in a child process.
IN_PROCESS = os.environ.get("TRITON_INTERPRET") == "1" or (
    "triton" not in sys.modules and not torch.cuda.is_available()
)
if IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"

from bullet_kernels import kernels as K  # noqa: E402
from bullet_kernels.kernels import reference as R  # noqa: E402
from bullet_kernels.kernels import (  # noqa: E402
    activation,
    decode_attention,
    gemm,
    norm,
    prefill_attention,
    rotary,
    sizing,
)


def test_interpreter_in_child_process():
    if IN_PROCESS:
        pytest.skip("the interpreter runs in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


@pytest.fixture(autouse=True)
def _interpreted(request):
    if not IN_PROCESS and request.node.name != "test_interpreter_in_child_process":
        pytest.skip("runs in the child process (see test_interpreter_in_child_process)")


TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "kernel left NaN (unwritten) elements"
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def paged_cache(num_pages, page_size, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
    v = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
    return k, v


def page_table_for(lens, page_size, num_pages, width, seed=0):
    """Scattered pages (a random permutation), width columns; unused entries hold junk ids."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_pages, generator=g)
    assert sum(-(-n // page_size) for n in lens) <= num_pages
    table = torch.randint(0, num_pages, (len(lens), width), generator=g, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        need = -(-n // page_size)
        table[b, :need] = perm[used : used + need].int()
        used += need
    return table


# ---------------------------------------------------------------- sizing


def test_sm_budget_nests_and_restores():
    full = sizing.current_sm_budget()
    assert full == sizing.device_sm_count()
    with sizing.sm_budget(32):
        assert sizing.current_sm_budget() == 32
        with sizing.sm_budget(16):
            assert sizing.current_sm_budget() == 16
        assert sizing.current_sm_budget() == 32
    assert sizing.current_sm_budget() == full
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError):
            with sizing.sm_budget(bad):
                pass


def test_int64_offsets_follow_what_a_view_can_address():
    dense = torch.empty(4, 16, 2, 64)
    assert decode_attention._extent(dense) == dense.numel()
    k_of_kv = torch.empty(4, 2, 16, 2, 64)[:, 0]  # K interleaved with V: strided beyond its numel
    assert decode_attention._extent(k_of_kv) == dense.numel() + (16 * 2 * 64) * 3


def test_decode_splits_follow_budget_not_lengths():
    small = sizing.decode_kv_splits(16, 8, 4, 4096, sms=16)
    large = sizing.decode_kv_splits(16, 8, 4, 4096, sms=132)
    assert 1 <= small < large
    assert sizing.decode_kv_splits(256, 8, 4, 4096, sms=132) == 1  # 2048 programs already fill 132 SMs
    assert sizing.decode_kv_splits(1, 8, 4, 300, sms=132) == 1  # too short to split
    with sizing.sm_budget(16):
        assert sizing.decode_kv_splits(16, 8, 4, 4096) == small


# ---------------------------------------------------------------- dispatcher


def test_linear_uses_the_gemm_of_the_current_phase(monkeypatch):
    """decode and prefill GEMMs follow BULLET_LINEAR per phase; the model sets the phase."""
    from bullet_kernels import kernels

    chosen = []
    monkeypatch.setattr(kernels, "_triton", lambda *t: True)  # as on a GPU: the choice matters
    monkeypatch.setattr(kernels.gemm, "linear", lambda x, w: chosen.append("triton") or F.linear(x, w))
    monkeypatch.setenv("BULLET_LINEAR", "decode=triton,prefill=cublas")
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    kernels.linear(x, w)  # outside any phase: prefill's
    with kernels.gemm_phase("decode"):
        out = kernels.linear(x, w)
        with kernels.gemm_phase("prefill"):
            kernels.linear(x, w)
        kernels.linear(x, w)
    assert chosen == ["triton", "triton"]
    torch.testing.assert_close(out, F.linear(x, w))
    with pytest.raises(ValueError, match="phase must be one of decode, prefill, got 'mixed'"):
        with kernels.gemm_phase("mixed"):
            pass


def test_gemms_through_hands_every_gemm_to_the_runner_and_nothing_else():
    from bullet_kernels import kernels

    seen = []

    def runner(gemm):
        seen.append("gemm")
        return gemm()

    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with kernels.gemms_through(runner):
        out = kernels.linear(kernels.silu_and_mul(torch.randn(4, 16)), w)
        kernels.rms_norm(x, torch.ones(8), 1e-6)
        with kernels.gemms_through(None):  # an inner scope may turn it off
            kernels.linear(x, w)
    kernels.linear(x, w)
    assert seen == ["gemm"] and out.shape == (4, 6)


def test_cublaslt_target_is_the_budget_as_torchs_carveout():
    from bullet_kernels.kernels import blas_target

    assert blas_target.carveout_for(40, 132) == 92  # torch targets device SMs - carveout
    assert blas_target.carveout_for(132, 132) is None  # the whole GPU: no target at all
    for bad in (0, 133, 40.0, True):
        with pytest.raises(ValueError, match="SM-count target"):
            blas_target.carveout_for(bad, 132)


def test_cublaslt_target_without_cublaslt_says_so_and_restores_torch():
    from bullet_kernels.kernels import blas_target

    if torch.cuda.is_available():
        pytest.skip("this torch has cuBLASLt: the scope is tested in test_kernels_gpu.py")
    before = (torch.backends.cuda.preferred_blas_library(), torch._C._get_sm_carveout_experimental())
    with pytest.raises(RuntimeError, match="BULLET_LINEAR=cublaslt-target needs a torch built with cuBLASLt"):
        with blas_target.cublaslt_sm_target(40):
            pass
    assert (torch.backends.cuda.preferred_blas_library(), torch._C._get_sm_carveout_experimental()) == before


def test_dispatcher_runs_reference_on_cpu(monkeypatch):
    x = torch.randn(3, 40)
    w = torch.randn(40)
    assert torch.equal(K.rms_norm(x, w, 1e-6), R.rms_norm(x, w, 1e-6))
    W = torch.randn(24, 40)
    assert torch.equal(K.linear(x, W), F.linear(x, W))
    monkeypatch.setenv("BULLET_KERNELS", "reference")
    assert not K._triton(x)
    assert K.paged_decode_attention.__doc__ == R.paged_decode_attention.__doc__


# ---------------------------------------------------------------- elementwise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 64), (5, 100)])
def test_rms_norms(dtype, rows, hidden):
    x = torch.randn(rows, hidden).to(dtype)
    r = torch.randn(rows, hidden).to(dtype)
    w = torch.rand(hidden).to(dtype) + 0.5
    out = norm.rms_norm(x, w, 1e-6, out=nan_like(x))
    assert rel_err(out, R.rms_norm(x, w, 1e-6)) < TOL[dtype]
    y, s = norm.fused_add_rms_norm(x, r, w, 1e-5, out=nan_like(x), residual_out=nan_like(x))
    y_ref, s_ref = R.fused_add_rms_norm(x, r, w, 1e-5)
    if dtype == torch.float32:
        assert torch.equal(s, s_ref)
    else:  # the interpreter truncates fp32 -> bf16; the GPU rounds to nearest (exact there)
        assert rel_err(s, s_ref) < TOL[dtype]
    assert rel_err(y, y_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype):
    x = (3 * torch.randn(3, 2 * 700)).to(dtype)  # 700: not a multiple of the block
    out = activation.silu_and_mul(x, out=nan_like(x[:, :700]), block=256)
    assert rel_err(out, R.silu_and_mul(x.float())) < TOL[dtype]


def _cos_sin(max_pos, d):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    f = torch.arange(max_pos).float()[:, None] * inv[None]
    return torch.cat([f.cos(), f.sin()], -1)


@pytest.mark.parametrize("dtype,d,hq,hkv,page_size", [
    (torch.float32, 64, 4, 4, 8),
    (torch.bfloat16, 128, 8, 2, 16),
    (torch.bfloat16, 64, 6, 3, 32),  # non power-of-two head counts
])
def test_rotary_and_store_kv(dtype, d, hq, hkv, page_size):
    T, pages = 7, 4
    q = torch.randn(T, hq, d).to(dtype)
    k = torch.randn(T, hkv, d).to(dtype)
    v = torch.randn(T, hkv, d).to(dtype)
    pos = torch.tensor([0, 5, 17, 3, 9, 30, 1])
    slots = torch.tensor([3, -1, 2 * page_size + 1, 0, -1, pages * page_size - 1, page_size])
    cs = _cos_sin(64, d)
    kc, vc = paged_cache(pages, page_size, hkv, d, dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_rot, k_rot = rotary.rotary_and_store_kv(q, k, v, pos, cs, kc, vc, slots,
                                              q_out=nan_like(q), k_out=nan_like(k))
    q_ref, k_ref = R.rotary_and_store_kv(q, k, v, pos, cs, kc_ref, vc_ref, slots)
    assert rel_err(q_rot, q_ref) < TOL[dtype] and rel_err(k_rot, k_ref) < TOL[dtype]
    assert rel_err(kc, kc_ref) < TOL[dtype]
    assert torch.equal(vc, vc_ref)  # v is copied bit for bit; slot -1 writes nothing
    x = rotary.apply_rotary(q, pos, cs, out=nan_like(q))
    assert rel_err(x, R.apply_rotary(q, pos, cs)) < TOL[dtype]


# ---------------------------------------------------------------- decode attention


DECODE_CASES = [
    # dtype, Hq, Hkv, D, page_size, lens (0 = padding row), splits
    (torch.float32, 4, 4, 64, 16, [37], 1),  # batch 1, MHA
    (torch.float32, 8, 2, 64, 8, [37, 0, 129], 3),  # GQA 4, padding row, ragged splits
    (torch.bfloat16, 8, 1, 128, 16, [1, 200, 0, 64], None),  # GQA 8, head_dim 128, auto splits
    (torch.bfloat16, 8, 2, 64, 32, [250, 3], 5),  # more splits than some rows can use
    (torch.float16, 4, 1, 64, 16, [77, 18], 2),
    (torch.float32, 4, 4, 64, 16, [37, 0, 5], 9),  # MHA split: more splits than any row has tiles
    (torch.bfloat16, 16, 2, 64, 16, [100, 0, 250], 6),  # GQA 8 split, padding row
]
MERGES = ["separate", "fused"]


def decode_problem(dtype, hq, hkv, d, page_size, lens, seed=0):
    """``(q, k_cache, v_cache, page_table, seq_lens)`` of a decode batch on scattered pages."""
    width = max(-(-max(lens) // page_size), 1) + 1
    pages = sum(-(-n // page_size) for n in lens) + 3
    kc, vc = paged_cache(pages, page_size, hkv, d, dtype, seed=seed)
    table = page_table_for(lens, page_size, pages, width, seed=seed)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return q, kc, vc, table, seq_lens


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("offs64", [False, True], ids=["int32-offsets", "int64-offsets"])
@pytest.mark.parametrize("block_n", [16, 32])
@pytest.mark.parametrize("dtype,hq,hkv,d,page_size,lens,splits", DECODE_CASES)
def test_paged_decode_attention(dtype, hq, hkv, d, page_size, lens, splits, block_n, offs64, merge, monkeypatch):
    if offs64:  # the path for caches past 2**31 elements, forced on a small one
        monkeypatch.setattr(decode_attention, "OFFS64_FROM", 0)
    # Each variant its own data: a merge that read the wrong partials could otherwise find the
    # right numbers, left in freed memory by the previous variant of the same case.
    seed = block_n + 2 * offs64 + 4 * MERGES.index(merge)
    q, kc, vc, table, seq_lens = decode_problem(dtype, hq, hkv, d, page_size, lens, seed=seed)
    with sizing.sm_budget(8):
        out = decode_attention.paged_decode_attention(
            q, kc, vc, table, seq_lens, d**-0.5, out=nan_like(q), num_splits=splits, block_n=block_n, merge=merge)
    ref = R.paged_decode_attention(q.float(), kc.float(), vc.float(), table, seq_lens, d**-0.5)
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.all(out[seq_lens == 0] == 0)


def test_decode_attention_merge_modes_are_checked(monkeypatch):
    monkeypatch.delenv("BULLET_DECODE_MERGE", raising=False)
    from bullet_kernels.config import DECODE_MERGES, DEFAULT_DECODE_MERGE

    assert decode_attention.check_merge(None) == DEFAULT_DECODE_MERGE in DECODE_MERGES
    monkeypatch.setenv("BULLET_DECODE_MERGE", "fused")  # one setting flips every caller that passes None
    assert decode_attention.check_merge(None) == "fused" and decode_attention.check_merge("separate") == "separate"
    monkeypatch.delenv("BULLET_DECODE_MERGE")
    q, kc, vc, table, seq_lens = decode_problem(torch.float32, 4, 2, 64, 16, [40, 7])
    with pytest.raises(ValueError, match="merge must be one of separate, fused .*got 'fuse'"):
        decode_attention.paged_decode_attention(q, kc, vc, table, seq_lens, 0.1, num_splits=1, merge="fuse")
    with pytest.raises(ValueError, match="merge_counters is for merge='fused'"):
        decode_attention.paged_decode_attention(q, kc, vc, table, seq_lens, 0.1, num_splits=2, merge="separate",
                                                merge_counters=torch.zeros(4, dtype=torch.int32))
    for bad in (torch.zeros(4, dtype=torch.int64), torch.zeros(3, dtype=torch.int32)):  # 2 sequences x 2 KV heads
        with pytest.raises(ValueError, match="merge_counters must be a contiguous int32 tensor .* at least 4"):
            decode_attention.paged_decode_attention(q, kc, vc, table, seq_lens, 0.1, num_splits=2, merge="fused",
                                                    merge_counters=bad)


def test_fused_merge_is_done_by_the_last_split_and_leaves_counters_zeroed():
    """A caller's counter buffer is zero again after each call (reusable), and a group is written
    only by the program whose arrival is the last: a counter that cannot reach it (started at -1)
    leaves its group's rows unwritten, while the other groups are still right."""
    dtype, hq, hkv, d, splits = torch.float32, 8, 2, 64, 3
    q, kc, vc, table, seq_lens = decode_problem(dtype, hq, hkv, d, 16, [90, 0, 45])
    ref = R.paged_decode_attention(q.float(), kc.float(), vc.float(), table, seq_lens, d**-0.5)
    counters = torch.zeros(3 * hkv + 5, dtype=torch.int32)  # more than needed is fine
    for _ in range(2):
        out = decode_attention.paged_decode_attention(q, kc, vc, table, seq_lens, d**-0.5, out=nan_like(q),
                                                      num_splits=splits, merge="fused", merge_counters=counters)
        assert rel_err(out, ref) < TOL[dtype]
        assert torch.all(counters == 0)
    counters[2 * hkv + 1] = -1  # sequence 2, KV head 1: its arrivals count -1, 0, 1, never splits - 1
    out = decode_attention.paged_decode_attention(q, kc, vc, table, seq_lens, d**-0.5, out=nan_like(q),
                                                  num_splits=splits, merge="fused", merge_counters=counters)
    group = hq // hkv
    assert torch.isnan(out[2, group:]).all()
    assert rel_err(out[:2], ref[:2]) < TOL[dtype] and rel_err(out[2, :group], ref[2, :group]) < TOL[dtype]
    assert counters[2 * hkv + 1] == splits - 1  # untouched by a merge: no program saw itself last


def ragged_batch(dtype, hq, hkv, d, page_size, q_lens, prefix, pad, seed):
    """A prefill-path batch: ``q_lens[b]`` new tokens after ``prefix[b]`` cached ones, then
    ``pad`` padding rows; ``(q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens)``."""
    lens = [a + b for a, b in zip(q_lens, prefix)]
    width = max(-(-max(lens) // page_size), 1) + 1
    pages = sum(-(-n // page_size) for n in lens) + 2
    kc, vc = paged_cache(pages, page_size, hkv, d, dtype, seed=seed)
    table = page_table_for(lens, page_size, pages, width, seed=seed)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]) + pad, hq, d).to(dtype)
    return q, kc, vc, table, cu, seq_lens


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("splits", [1, 3, 8])  # 8: more splits than the shorter contexts have tiles
def test_decode_attention_on_ragged_rows_writes_only_one_token_sequences(splits, merge):
    """The decode rows of a chunked-prefill step: sequence b's query is row cu[b]; sequences
    with more (or no) new tokens are the prefill kernel's and their rows stay untouched."""
    dtype, hq, hkv, d, page_size = torch.bfloat16, 8, 2, 64, 16
    # The last two sequences are padding (no tokens) and there are no padding rows: their row
    # cu[b] is one past the end of q, which no program may write (checked below) or read (the
    # kernel masks that load too; the interpreter does not check bounds, compute-sanitizer would).
    q_lens = [1, 5, 1, 0, 1, 0, 0]
    q, kc, vc, table, cu, seq_lens = ragged_batch(dtype, hq, hkv, d, page_size, q_lens, [40, 3, 0, 0, 90, 0, 0], 0,
                                                  seed=2 + splits + 10 * MERGES.index(merge))
    out = decode_attention.paged_decode_attention(q, kc, vc, table, seq_lens, d**-0.5, out=nan_like(q),
                                                  num_splits=splits, cu_seqlens_q=cu, merge=merge)
    ref = R.paged_prefill_attention(q.float(), kc.float(), vc.float(), table, cu, seq_lens, d**-0.5)
    single = [int(cu[b]) for b, n in enumerate(q_lens) if n == 1]
    assert rel_err(out[single], ref[single]) < TOL[dtype]
    others = [r for r in range(q.shape[0]) if r not in single]
    assert torch.isnan(out[others]).all()


# ---------------------------------------------------------------- prefill attention


PREFILL_CASES = [
    # dtype, Hq, Hkv, D, page_size, q_lens, cached prefix lens, padding tokens, block_m
    (torch.float32, 2, 2, 64, 16, [19], [0], 0, 16),  # one plain causal request
    (torch.float32, 8, 2, 64, 8, [5, 0, 33, 1], [10, 0, 0, 40], 3, 32),  # prefix cache, empty req, padding
    (torch.bfloat16, 8, 1, 128, 16, [17, 2], [3, 29], 5, 64),  # GQA 8, head_dim 128
    (torch.bfloat16, 4, 1, 64, 32, [40, 7, 1], [0, 60, 12], 0, 16),  # GQA 4
    # a chunked-prefill step: a chunk among decode rows (one new token after a long prefix)
    (torch.bfloat16, 8, 2, 64, 16, [1, 23, 1, 1], [70, 9, 0, 130], 4, 32),
]


@pytest.mark.parametrize("by_decode_kernel", [True, False], ids=["single-rows-by-decode-kernel", "one-kernel"])
@pytest.mark.parametrize("dtype,hq,hkv,d,page_size,q_lens,prefix,pad,block_m", PREFILL_CASES)
def test_paged_prefill_attention(dtype, hq, hkv, d, page_size, q_lens, prefix, pad, block_m, by_decode_kernel):
    q, kc, vc, table, cu, seq_lens = ragged_batch(dtype, hq, hkv, d, page_size, q_lens, prefix, pad, seed=1)
    out = prefill_attention.paged_prefill_attention(
        q, kc, vc, table, cu, seq_lens, d**-0.5, out=nan_like(q), block_m=block_m, block_n=16,
        single_rows_by_decode_kernel=by_decode_kernel)
    ref = R.paged_prefill_attention(q.float(), kc.float(), vc.float(), table, cu, seq_lens, d**-0.5)
    assert rel_err(out, ref) < TOL[dtype]
    if pad:
        assert torch.all(out[-pad:] == 0)


# ---------------------------------------------------------------- GEMM


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,split,k", [(1, 1, 200), (5, 3, 200), (33, 2, 200), (16, 4, 256)])
def test_splitk_linear(dtype, m, split, k):
    n = 80  # not a multiple of the tiles; k = 200 is not either (masked K loop), 256 is
    x = torch.randn(m, k).to(dtype)
    w = torch.randn(n, k).to(dtype)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": split}
    y = gemm.linear(x, w, cfg=cfg)
    assert y.shape == (m, n)
    assert rel_err(y, x.float() @ w.float().T) < TOL[dtype]


def test_gemm_config_splits_more_on_bigger_budgets():
    assert gemm.config(16, 4096, 14336, sms=132)["SPLIT_K"] > gemm.config(16, 4096, 14336, sms=16)["SPLIT_K"]
    assert gemm.config(256, 14336, 4096, sms=132)["SPLIT_K"] == 1
