"""Decode on SM partitions: copy, attention, GEMMs and the decode step, ours against stock.

Llama-3.1-8B decode shapes, bf16. For each SM count, one verified lane (``--bench-backend``,
default green) runs everything below with launches sized for its granted SMs; every time is a
CUDA graph replayed on the lane's stream (CUDA events, per-call samples in the JSON):

1. copy: 1 GiB through torch's ``copy_`` and a persistent copy sized to the lane (bytes read +
   written): the bandwidth the lane can draw;
2. attention: ours (split-KV paged) vs torch SDPA over a contiguous cache vs FlashInfer's paged
   decode where it imports; TB/s and the share of the lane's copy bandwidth;
3. gemm: cuBLAS (``F.linear``) vs cuBLASLt told the lane's SM count (``cublaslt_target``,
   :mod:`bullet_kernels.kernels.blas_target`) vs our split-K Triton GEMM on the decode
   projections (weights rotated through >= 256 MB of copies so L2 does not serve them);
4. step: one decoder layer replayed 32 times in one graph = one decode step (less embedding and
   LM head): stock (cuBLAS + SDPA + unfused torch ops) vs ours (with cuBLAS, with cuBLASLt's
   SM-count target, with our GEMM).

Every row also carries the lane's measured peaks, its roofline (``max(bytes / copy, flops /
GEMM peak)``) and the SM clock and power sampled while it ran.

    python3 -m pytest bench/test_decode_partitions.py -m gpu [--bench-size full]

Writes bench/results/decode-<gpu>-<yyyymmdd>.json and .png.
"""

from __future__ import annotations

import functools
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from bench.decode_layer import (
    BF16, LLAMA, ROTATE_BYTES, DecodeLayer, KeepLast, attention_bytes, attention_flops, flashinfer_decode,
    gemm_shapes, paged_kv, rotated_weights, sdpa_decode,
)
from bench.rows import select
from bullet_kernels import measure
from bullet_kernels.kernels import blas_target, decode_attention, gemm
from bullet_kernels.kernels.sizing import current_sm_budget, decode_kv_splits

BENCHMARK = "decode"
MAX_TOKENS = 1 << 20  # batch x context above this is left out (KV memory per cache copy)


def attention_shapes(batches, contexts):
    return [(b, c) for b in batches for c in contexts if b * c <= MAX_TOKENS]


GRID = {
    "quick": {
        "copy_impl": ("torch", "persistent"),
        "attention_shape": attention_shapes((16, 128), (1024, 4096, 32768)),
        "attention_impl": ("ours", "sdpa", "flashinfer"),
        "gemm_op": ("qkv", "o", "gate_up", "down"),
        "gemm_m": (16, 128),
        "gemm_impl": ("cublas", "cublaslt_target", "triton"),
        "step_batch": (16, 128),
        "step_impl": ("stock", "ours", "ours_cublaslt_target"),
        "sms": (16, 32, 40, 64, "all"),
    },
    "full": {
        "copy_impl": ("torch", "persistent"),
        "attention_shape": attention_shapes((16, 64, 128, 256), (1024, 4096, 16384, 32768)),
        "attention_impl": ("ours", "sdpa", "flashinfer"),
        "gemm_op": ("qkv", "o", "gate_up", "down", "lm_head"),
        "gemm_m": (16, 64, 128, 256),
        "gemm_impl": ("cublas", "cublaslt_target", "triton"),
        "step_batch": (16, 64, 128),
        "step_impl": ("stock", "ours", "ours_cublaslt_target", "ours_triton_gemm"),
        "sms": (16, 24, 32, 40, 48, 64, 96, "all"),  # last: varies fastest, so one shape's inputs serve every lane
    },
}
STEP_CONTEXT = 4096
COPY_BYTES = 1 << 30

inputs = KeepLast()  # the big inputs of the latest shape, shared by the tests of that shape


@pytest.fixture(scope="module", autouse=True)
def drop_inputs_after_module():
    yield
    inputs.clear()


@pytest.mark.gpu
def test_copy(benchmark, bench, recorder, sms, copy_impl):
    lane = bench.lane(sms)
    src = torch.randn(COPY_BYTES // 4, device="cuda")
    dst = torch.empty_like(src)
    programs = 4 * lane.granted
    fn = {"torch": lambda: dst.copy_(src), "persistent": lambda: measure.persistent_copy(src, dst, programs)}[copy_impl]
    row = bench.time_graph(benchmark, lane, [fn] * 3)
    nbytes = 2 * src.nbytes
    recorder.add({"kind": "copy", "impl": copy_impl, **row, "bytes": nbytes,
                  "tbps": nbytes / (row["median_ms"] * 1e-3) / 1e12})


def attention_inputs(batch: int, ctx: int):
    """Cache copies to rotate through so no replay finds its K/V in L2 (a single small cache
    replayed back to back measured above copy bandwidth)."""
    copies = max(1, min(4, math.ceil(ROTATE_BYTES / attention_bytes(LLAMA, batch, ctx))))
    q = torch.randn(batch, LLAMA.heads, LLAMA.head_dim, device="cuda", dtype=BF16)
    caches = [paged_kv(LLAMA, batch, ctx) for _ in range(copies)]
    contig = [tuple(torch.randn(batch, LLAMA.kv_heads, ctx, LLAMA.head_dim, device="cuda", dtype=BF16) for _ in range(2))
              for _ in range(copies)]
    return q, caches, contig


@pytest.mark.gpu
def test_attention(benchmark, bench, recorder, sms, attention_shape, attention_impl):
    batch, ctx = attention_shape
    lane = bench.lane(sms)
    q, caches, contig = inputs.get(("attention", batch, ctx), lambda: attention_inputs(batch, ctx))
    scale = LLAMA.head_dim**-0.5
    if attention_impl == "ours":
        calls = [functools.partial(decode_attention.paged_decode_attention, q, *c, scale) for c in caches]
    elif attention_impl == "sdpa":
        calls = [functools.partial(sdpa_decode, q, k, v) for k, v in contig]
    else:
        pytest.importorskip("flashinfer", reason="FlashInfer is an optional comparison; it is not installed")
        with lane.use():  # FlashInfer plans for the stream it runs on
            calls = [flashinfer_decode(LLAMA, q, *c[:3], ctx) for c in caches]
    calls = (calls * 4)[: max(4, len(calls))]
    try:
        row = bench.time_graph(benchmark, lane, calls)
    except Exception as exc:
        if attention_impl != "flashinfer":
            raise  # ours and stock must work; FlashInfer is an optional comparison
        torch.cuda.synchronize()
        recorder.add({"kind": "attention", "impl": attention_impl, "batch": batch, "ctx": ctx, "sms": lane.granted,
                      "error": f"{type(exc).__name__}: {exc}"})
        pytest.skip(f"FlashInfer failed on {lane.granted} SMs: {type(exc).__name__}: {exc}")
    nbytes, flops = attention_bytes(LLAMA, batch, ctx), attention_flops(LLAMA, batch, ctx)
    row.update(measure.roofline_fields(row["median_ms"], nbytes, flops, lane.peaks()))
    row["pct_of_copy"] = 100 * row["tbps"] / row["lane_copy_tbps"]
    if attention_impl == "ours":
        row["splits"] = decode_kv_splits(batch, LLAMA.kv_heads, LLAMA.group, ctx, lane.granted)
    recorder.add({"kind": "attention", "impl": attention_impl, "batch": batch, "ctx": ctx, **row})


def cublaslt_target_linear(x, w):
    """``F.linear`` through cuBLASLt with the SM budget (the lane's, during capture) as target."""
    with blas_target.cublaslt_sm_target(current_sm_budget()):
        return F.linear(x, w)


@pytest.mark.gpu
def test_gemm(benchmark, bench, recorder, sms, gemm_op, gemm_m, gemm_impl):
    n_out, k_in = gemm_shapes(LLAMA)[gemm_op]
    lane = bench.lane(sms)
    weights = inputs.get(("gemm", gemm_op), lambda: rotated_weights(n_out, k_in))
    x = torch.randn(gemm_m, k_in, device="cuda", dtype=BF16)
    linear = {"cublas": F.linear, "cublaslt_target": cublaslt_target_linear, "triton": gemm.linear}[gemm_impl]
    row = bench.time_graph(benchmark, lane, [functools.partial(linear, x, w) for w in weights])
    nbytes = n_out * k_in * 2 + gemm_m * (k_in + n_out) * 2
    row.update(measure.roofline_fields(row["median_ms"], nbytes, 2 * gemm_m * n_out * k_in, lane.peaks()))
    if gemm_impl == "triton":
        row["config"] = gemm.config(gemm_m, n_out, k_in, lane.granted)
    recorder.add({"kind": "gemm", "impl": gemm_impl, "op": gemm_op, "m": gemm_m, "n": n_out, "k": k_in, **row})


@pytest.mark.gpu
def test_step(benchmark, bench, recorder, sms, step_batch, step_impl):
    lane = bench.lane(sms)
    layer = inputs.get(("step", step_batch), lambda: DecodeLayer(LLAMA, step_batch, STEP_CONTEXT))
    fn = {"stock": layer.stock, "ours": layer.ours,
          "ours_cublaslt_target": functools.partial(layer.ours, cublaslt_target_linear),
          "ours_triton_gemm": functools.partial(layer.ours, gemm.linear)}[step_impl]
    row = bench.time_graph(benchmark, lane, [fn] * LLAMA.layers, calls_per_round=2)
    row.update(measure.roofline_fields(row["median_ms"], layer.step_bytes(), layer.step_flops(), lane.peaks()))
    row["step_ms"] = row["median_ms"] * LLAMA.layers  # per-layer time x 32 layers
    recorder.add({"kind": "step", "impl": step_impl, "batch": step_batch, "ctx": STEP_CONTEXT, **row})


# --------------------------------------------------------------------------- summary, plot


def geomean(xs) -> float:
    xs = list(xs)
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def summarize(rows: list[dict]) -> dict:
    s: dict = {"lane_peaks": {}}
    for r in select(rows, kind="attention") + select(rows, kind="gemm") + select(rows, kind="step"):
        s["lane_peaks"][r["sms"]] = {"copy_tbps": r["lane_copy_tbps"], "gemm_tflops": r["lane_gemm_tflops"]}
    full = max((r["sms"] for r in rows), default=0)
    for n in sorted({r["sms"] for r in rows}):
        ours, sdpa = select(rows, kind="attention", impl="ours", sms=n), select(rows, kind="attention", impl="sdpa", sms=n)
        if ours:
            s[f"attention_pct_of_copy_min@{n}"] = round(min(r["pct_of_copy"] for r in ours), 1)
            s[f"attention_pct_of_copy_median@{n}"] = round(statistics.median(r["pct_of_copy"] for r in ours), 1)
            s[f"attention_speedup_vs_sdpa_geomean@{n}"] = round(geomean(
                a["median_ms"] / o["median_ms"] for o in ours for a in sdpa if (a["batch"], a["ctx"]) == (o["batch"], o["ctx"])), 3)
        cub, tri = select(rows, kind="gemm", impl="cublas", sms=n), select(rows, kind="gemm", impl="triton", sms=n)
        pairs = [c["median_ms"] / t["median_ms"] for c in cub for t in tri if (c["op"], c["m"]) == (t["op"], t["m"])]
        if pairs:
            s[f"gemm_triton_speedup_vs_cublas_geomean@{n}"] = round(geomean(pairs), 3)
        lt = select(rows, kind="gemm", impl="cublaslt_target", sms=n)
        pairs = [c["median_ms"] / t["median_ms"] for c in cub for t in lt if (c["op"], c["m"]) == (t["op"], t["m"])]
        if pairs:
            s[f"gemm_cublaslt_target_speedup_vs_cublas_geomean@{n}"] = round(geomean(pairs), 3)
        for r in select(rows, kind="step", impl="ours", sms=n):
            s[f"step_b{r['batch']}_ours_pct_of_roofline@{n}"] = round(r["pct_of_roofline"], 1)
    for stock in select(rows, kind="step", impl="stock", sms=full):
        for ours in select(rows, kind="step", impl="ours", batch=stock["batch"]):
            s[f"step_b{stock['batch']}_ours@{ours['sms']}_over_stock@{full}"] = round(ours["step_ms"] / stock["step_ms"], 3)
    return s


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    copy = sorted(select(rows, kind="copy", impl="persistent"), key=lambda r: r["sms"])
    ax.plot([r["sms"] for r in copy], [r["tbps"] for r in copy], "k--", label="copy")
    shapes = sorted({(r["batch"], r["ctx"]) for r in select(rows, kind="attention")})
    if shapes:
        largest = max(shapes, key=lambda sh: sh[0] * sh[1])
        for impl, style in (("ours", "-o"), ("sdpa", "-s"), ("flashinfer", "-^")):
            for b, c in dict.fromkeys([largest, shapes[0]]):
                rr = sorted(select(rows, kind="attention", impl=impl, batch=b, ctx=c), key=lambda r: r["sms"])
                if rr:
                    ax.plot([r["sms"] for r in rr], [r["tbps"] for r in rr], style, label=f"{impl} b{b} ctx{c}")
    ax.set(xlabel="SMs", ylabel="TB/s", title="decode attention bandwidth")
    ax.legend(fontsize=7)
    ax = axes[1]
    for impl, style in (("stock", "-s"), ("ours", "-o"), ("ours_triton_gemm", ":o")):
        for b in sorted({r["batch"] for r in select(rows, kind="step")}):
            rr = sorted(select(rows, kind="step", impl=impl, batch=b), key=lambda r: r["sms"])
            if rr:
                ax.plot([r["sms"] for r in rr], [r["step_ms"] for r in rr], style, label=f"{impl} b{b}")
    ax.set(xlabel="SMs", ylabel="ms / decode step (32 layers)", title="decode step", yscale="log")
    ax.legend(fontsize=7)
    ax = axes[2]
    for op in sorted({r["op"] for r in select(rows, kind="gemm")}):
        for m in sorted({r["m"] for r in select(rows, kind="gemm")}):
            cub = {r["sms"]: r["median_ms"] for r in select(rows, kind="gemm", impl="cublas", op=op, m=m)}
            tri = {r["sms"]: r["median_ms"] for r in select(rows, kind="gemm", impl="triton", op=op, m=m)}
            both = sorted(set(cub) & set(tri))
            ax.plot(both, [cub[n] / tri[n] for n in both], "-o", label=f"{op} m{m}", ms=3)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(xlabel="SMs", ylabel="cuBLAS time / Triton time", title="split-K GEMM vs cuBLAS")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict], summary: dict) -> str:
    lines = [f"{'kind':<10}{'impl':<18}{'shape':<22}{'sms':>5}{'ms':>10}{'TB/s':>8}{'%roof':>7}{'MHz':>7}"]
    for r in select(rows):
        shape = {"attention": lambda: f"b{r['batch']} ctx{r['ctx']}", "gemm": lambda: f"{r['op']} m{r['m']}",
                 "step": lambda: f"b{r['batch']} ctx{r['ctx']} x32", "copy": lambda: "1 GiB"}[r["kind"]]()
        ms = r.get("step_ms", r["median_ms"])
        tb = f"{r['tbps']:.2f}" if "tbps" in r else ""
        roof = f"{r['pct_of_roofline']:.0f}" if "pct_of_roofline" in r else ""
        mhz = f"{r['sm_clock_mhz']:.0f}" if isinstance(r.get("sm_clock_mhz"), (int, float)) else "n/a"
        lines.append(f"{r['kind']:<10}{r['impl']:<18}{shape:<22}{r['sms']:>5}{ms:>10.3f}{tb:>8}{roof:>7}{mhz:>7}")
    lines += ["summary:"] + [f"  {k}: {v}" for k, v in summary.items() if k != "lane_peaks"]
    return "\n".join(lines)
