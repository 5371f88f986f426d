"""Decode on a small SM partition: our kernels vs stock, on real green-context partitions.

Llama-3.1-8B decode shapes (hidden 4096, 32 q / 8 kv heads, head_dim 128, MLP 14336), bf16.
For each SM count the decode lane of a verified partition runs everything below, launches
sized by ``sm_budget(granted SMs)``; every time is a CUDA graph replayed on the lane stream
(CUDA events, median of many replays, raw samples in the JSON):

1. copy: a 1 GiB device copy -> the bandwidth this partition can draw (read + write bytes);
2. attention: ours (split-KV paged) vs torch SDPA over a *contiguous* cache (stock without
   paging: generous to stock) vs FlashInfer's paged decode if importable; achieved TB/s of
   K+V+q+out bytes and its share of the copy bandwidth;
3. gemm: our split-K Triton GEMM vs cuBLAS (F.linear) on the decode projections (weights
   rotated through >= 256 MB of copies so L2 does not serve them);
4. step: one decoder layer captured once and replayed 32 times in one graph = one decode step
   (minus embedding / lm_head): stock (cuBLAS + SDPA + unfused torch ops) vs ours.

    python bench/bench_decode.py            # ~3 min on an H100 SXM
    python bench/bench_decode.py --quick    # ~1 min

Writes bench/results/decode-<gpu>-<yyyymmdd>.json and .png; prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bullet_kernels.kernels import activation, decode_attention, gemm, norm, reference, rotary  # noqa: E402
from bullet_kernels.kernels.sizing import current_sm_budget, sm_budget  # noqa: E402

SMS = (16, 28, 36, 52, 132)
ROTATE_BYTES = 256 << 20  # > 4x the H100's L2
BF16 = torch.bfloat16


@dataclasses.dataclass(frozen=True)
class Llama:
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    inter: int = 14336
    vocab: int = 128256
    layers: int = 32
    page_size: int = 16

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def qkv(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim


# ------------------------------------------------------------------------------- timing


def time_graph(calls, stream, reps: int) -> dict:
    """Capture ``calls`` (a list of thunks) in one graph on ``stream``; per-call ms samples.

    One warm-up pass runs first outside the capture (Triton compiles there). The lane stream of
    a green partition is non-blocking: nothing orders it after the default stream, where the
    inputs were just made (randn, randperm page table, seq_lens), so it waits for that stream
    first; otherwise a kernel could read a page table or lengths not yet written."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:
            fn()
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for fn in calls:
                fn()
        graph.replay()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record(stream)
            graph.replay()
            end.record(stream)
        stream.synchronize()
    samples = sorted(s.elapsed_time(e) / len(calls) for s, e in events)
    del graph
    return {
        "median_ms": statistics.median(samples),
        "p10_ms": samples[len(samples) // 10],
        "p90_ms": samples[(9 * len(samples)) // 10],
        "samples_ms": [round(x, 5) for x in samples],
    }


@triton.jit
def _persistent_copy(src, dst, n, BLOCK: tl.constexpr):
    start = tl.program_id(0) * BLOCK
    step = tl.num_programs(0) * BLOCK
    for offset in range(start, n, step):
        idx = offset + tl.arange(0, BLOCK)
        mask = idx < n
        tl.store(dst + idx, tl.load(src + idx, mask=mask), mask=mask)


def persistent_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    """A bandwidth reference whose grid fits the partition: 4 programs per SM of the budget."""
    _persistent_copy[(4 * current_sm_budget(),)](src, dst, src.numel(), BLOCK=4096, num_warps=8)


def tbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------------------- inputs


def paged_kv(cfg: Llama, batch: int, ctx: int, device="cuda", dtype=BF16):
    """A scattered paged cache holding ``ctx`` tokens for each of ``batch`` sequences."""
    pages_per_seq = math.ceil(ctx / cfg.page_size)
    pages = batch * pages_per_seq + 1
    shape = (pages, cfg.page_size, cfg.kv_heads, cfg.head_dim)
    kc = torch.randn(shape, device=device, dtype=dtype)
    vc = torch.randn(shape, device=device, dtype=dtype)
    table = torch.randperm(pages - 1, device=device)[: batch * pages_per_seq].view(batch, pages_per_seq).int()
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    return kc, vc, table, seq_lens


def attention_bytes(cfg: Llama, batch: int, ctx: int) -> int:
    kv = 2 * batch * ctx * cfg.kv_heads * cfg.head_dim * 2
    return kv + 2 * batch * cfg.heads * cfg.head_dim * 2


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Stock decode attention: the G query heads of a KV head ride as G query rows (GQA
    without repeating K/V), over a contiguous ``[B, Hkv, L, D]`` cache of full rows."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    return F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), k, v).reshape(b, hq, d)


def flashinfer_decode(cfg: Llama, q, kc, vc, table, ctx: int):
    """FlashInfer's paged decode (planned as its users do; it sizes work for the whole GPU)."""
    import flashinfer

    b = q.shape[0]
    pages_per_seq = table.shape[1]
    indptr = torch.arange(0, b + 1, device="cuda", dtype=torch.int32) * pages_per_seq
    indices = table.reshape(-1).contiguous()
    last = torch.full((b,), ctx - (pages_per_seq - 1) * cfg.page_size, dtype=torch.int32, device="cuda")
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=indptr,
        paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last)
    wrapper.plan(indptr, indices, last, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.page_size,
                 q_data_type=q.dtype, kv_data_type=kc.dtype)
    return lambda: wrapper.run(q, (kc, vc))


class Layer:
    """One Llama decoder layer at decode, as two graph-safe callables: ``stock`` and ``ours``."""

    def __init__(self, cfg: Llama, batch: int, ctx: int, device="cuda", dtype=BF16, stock_cache=True):
        self.cfg, self.b = cfg, batch
        rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype) / math.sqrt(s[-1])  # noqa: E731
        self.w_qkv, self.w_o = rnd(cfg.qkv, cfg.hidden), rnd(cfg.hidden, cfg.heads * cfg.head_dim)
        self.w_gu, self.w_down = rnd(2 * cfg.inter, cfg.hidden), rnd(cfg.hidden, cfg.inter)
        self.w_in = torch.ones(cfg.hidden, device=device, dtype=dtype)
        self.w_post = torch.ones(cfg.hidden, device=device, dtype=dtype)
        self.x = torch.randn(batch, cfg.hidden, device=device, dtype=dtype)
        self.res = torch.randn(batch, cfg.hidden, device=device, dtype=dtype)
        self.kc, self.vc, self.table, self.seq_lens = paged_kv(cfg, batch, ctx, device, dtype)
        self.positions = (self.seq_lens - 1).long()
        last_page = self.table[torch.arange(batch, device=device), (ctx - 1) // cfg.page_size].long()
        self.slots = last_page * cfg.page_size + (ctx - 1) % cfg.page_size
        inv = 1.0 / (500000 ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim))
        f = torch.arange(ctx + 1, device=device).float()[:, None] * inv[None]
        self.cos_sin = torch.cat([f.cos(), f.sin()], -1)
        self.scale = cfg.head_dim**-0.5
        if stock_cache:  # SDPA reads a contiguous copy: stock without the cost of paging
            shape = (batch, cfg.kv_heads, ctx, cfg.head_dim)
            self.k_contig = torch.randn(shape, device=device, dtype=dtype)
            self.v_contig = torch.randn(shape, device=device, dtype=dtype)

    def _split(self, qkv):
        c = self.cfg
        q, k, v = qkv.view(self.b, -1, c.head_dim).split([c.heads, c.kv_heads, c.kv_heads], dim=1)
        return q, k, v

    def stock(self):
        c = self.cfg
        h, res = reference.fused_add_rms_norm(self.x, self.res, self.w_in, 1e-5)
        q, k, v = self._split(F.linear(h, self.w_qkv))
        q = reference.apply_rotary(q, self.positions, self.cos_sin)
        k = reference.apply_rotary(k, self.positions, self.cos_sin)
        self.kc.view(-1, c.kv_heads, c.head_dim).index_copy_(0, self.slots, k)
        self.vc.view(-1, c.kv_heads, c.head_dim).index_copy_(0, self.slots, v)
        o = sdpa_decode(q, self.k_contig, self.v_contig)
        o = F.linear(o.reshape(self.b, -1), self.w_o)
        h, res = reference.fused_add_rms_norm(o, res, self.w_post, 1e-5)
        return F.linear(reference.silu_and_mul(F.linear(h, self.w_gu)), self.w_down)

    def ours(self, linear=F.linear):
        h, res = norm.fused_add_rms_norm(self.x, self.res, self.w_in, 1e-5)
        q, k, v = self._split(linear(h, self.w_qkv))
        q, _ = rotary.rotary_and_store_kv(q, k, v, self.positions, self.cos_sin, self.kc, self.vc, self.slots)
        o = decode_attention.paged_decode_attention(q, self.kc, self.vc, self.table, self.seq_lens, self.scale)
        o = linear(o.reshape(self.b, -1), self.w_o)
        h, res = norm.fused_add_rms_norm(o, res, self.w_post, 1e-5)
        return linear(activation.silu_and_mul(linear(h, self.w_gu)), self.w_down)


def gemm_shapes(cfg: Llama, full: bool) -> list[tuple[str, int, int]]:
    shapes = [("qkv", cfg.qkv, cfg.hidden), ("o", cfg.hidden, cfg.heads * cfg.head_dim),
              ("gate_up", 2 * cfg.inter, cfg.hidden), ("down", cfg.hidden, cfg.inter)]
    return shapes + ([("lm_head", cfg.vocab, cfg.hidden)] if full else [])


def rotated_weights(n: int, k: int, min_bytes: int = 256 << 20, cap: int = 8, device="cuda", dtype=BF16):
    """Enough copies of an [n, k] weight that cycling through them defeats the 50 MB L2."""
    copies = max(1, min(cap, math.ceil(min_bytes / (n * k * 2))))
    return [torch.randn(n, k, device=device, dtype=dtype) / math.sqrt(k) for _ in range(copies)]


# ------------------------------------------------------------------------------- the run


def lanes(sms_list, backend: str):
    """``{asked: (granted, stream)}`` on verified partitions (whole GPU for the full count)."""
    from bullet_kernels.partition import Partitioner, SMSplit

    part = Partitioner(backend)
    full = torch.cuda.get_device_properties(0).multi_processor_count
    out = {}
    for n in sms_list:
        pset = part.get(SMSplit(decode=min(n, full)))
        lane = pset.lane("decode")
        out[n] = (lane.granted, lane.stream)
    return part, out


def run(args) -> tuple[list[dict], dict]:
    cfg = Llama()
    part, lane_of = lanes(args.sms, args.backend)
    rows: list[dict] = []
    reps = 10 if args.quick else 20

    def on_lane(sms, kind, calls, **info):
        granted, stream = lane_of[sms]
        what = f"{kind} {info.get('impl', '')} {dict((k, v) for k, v in info.items() if k != 'impl')} on {granted} SMs"
        try:  # surface errors of earlier asynchronous work here, not in this measurement
            torch.cuda.synchronize()
            stream.synchronize()
        except Exception as exc:
            raise RuntimeError(f"a CUDA error was pending before {what}: {exc}") from exc
        try:
            with sm_budget(granted):
                t = time_graph(calls, stream, reps)
        except Exception as exc:  # name the measurement (CUDA errors are otherwise anonymous)
            raise RuntimeError(f"{what} failed: {type(exc).__name__}: {exc} (to pin the kernel: CUDA_LAUNCH_BLOCKING=1 ... --sms {sms})") from exc
        row = {"kind": kind, "sms_asked": sms, "sms": granted, **info, **t}
        rows.append(row)
        return row

    # 1. copy bandwidth of each partition
    # fp32 so the copy kernel moves 16-byte vectors; a uint8 copy is slower on few SMs and
    # would flatter every kernel measured against it.
    # Two copies per partition, the faster one is the reference: torch's copy_ (its grid is
    # sized for the whole GPU) and a persistent Triton copy with a grid sized to the partition.
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    copy_tbps = {}
    for n in args.sms:
        best = 0.0
        for impl, fn in (("torch", lambda: dst.copy_(src)), ("persistent", lambda: persistent_copy(src, dst))):
            r = on_lane(n, "copy", [fn] * 3, impl=impl, bytes=2 * src.nbytes)
            r["tbps"] = tbps(2 * src.nbytes, r["median_ms"])
            best = max(best, r["tbps"])
        copy_tbps[n] = best
    del src, dst

    # 2. attention
    try:
        import flashinfer  # noqa: F401

        fi_status = "installed"
    except Exception as exc:
        fi_status = f"not installed ({type(exc).__name__})"
    batches = (16, 128) if args.quick else (16, 64, 128, 256)
    contexts = (1024, 4096, 32768) if args.quick else (1024, 4096, 16384, 32768)
    for b in batches:
        for ctx in contexts:
            if b * ctx > args.max_tokens:
                continue
            nbytes = attention_bytes(cfg, b, ctx)
            # Rotate over enough cache copies that no replay finds its K/V in L2 (50 MB on the
            # H100): a single small cache replayed back to back measured above copy bandwidth.
            copies = max(1, min(4, math.ceil(ROTATE_BYTES / nbytes)))
            caches = [paged_kv(cfg, b, ctx) for _ in range(copies)]
            kc, vc, table, seq_lens = caches[0]
            q = torch.randn(b, cfg.heads, cfg.head_dim, device="cuda", dtype=BF16)
            contig = [(torch.randn(b, cfg.kv_heads, ctx, cfg.head_dim, device="cuda", dtype=BF16),
                       torch.randn(b, cfg.kv_heads, ctx, cfg.head_dim, device="cuda", dtype=BF16)) for _ in range(copies)]
            ours = [functools.partial(decode_attention.paged_decode_attention, q, *c, 0.088) for c in caches]
            stock = [functools.partial(sdpa_decode, q, k, v) for k, v in contig]
            for n in args.sms:
                impls = [("ours", ours), ("sdpa", stock)]
                if fi_status == "installed":
                    try:
                        with torch.cuda.stream(lane_of[n][1]):
                            lane_of[n][1].wait_stream(torch.cuda.default_stream())
                            fi = flashinfer_decode(cfg, q, kc, vc, table, ctx)
                            lane_of[n][1].synchronize()  # a failing plan is FlashInfer's, not ours
                            impls.append(("flashinfer", [fi]))
                    except Exception as exc:  # an optional comparison: record why, keep going
                        rows.append({"kind": "attention", "impl": "flashinfer", "sms_asked": n, "batch": b,
                                     "ctx": ctx, "error": f"{type(exc).__name__}: {exc}"})
                for name, fns in impls:
                    try:
                        calls = (fns * 4)[: max(4, len(fns))]
                        r = on_lane(n, "attention", calls, impl=name, batch=b, ctx=ctx, bytes=nbytes)
                    except Exception as exc:
                        if name != "flashinfer":
                            raise  # ours and stock must work; FlashInfer is an optional comparison
                        torch.cuda.synchronize()
                        rows.append({"kind": "attention", "impl": name, "sms_asked": n, "batch": b,
                                     "ctx": ctx, "error": f"{type(exc).__name__}: {exc}"})
                        continue
                    r["tbps"] = tbps(nbytes, r["median_ms"])
                    r["pct_of_copy"] = 100 * r["tbps"] / copy_tbps[n]
                    if name == "ours":
                        r["splits"] = decode_attention.decode_kv_splits(b, cfg.kv_heads, cfg.group, ctx, r["sms"])
            del kc, vc, table, seq_lens, caches, contig, ours, stock, q
            torch.cuda.empty_cache()

    # 3. gemm: ours vs cuBLAS
    ms = (16, 128) if args.quick else (16, 64, 128, 256)
    for name, n_out, k_in in gemm_shapes(cfg, not args.quick):
        ws = rotated_weights(n_out, k_in)
        for m in ms:
            x = torch.randn(m, k_in, device="cuda", dtype=BF16)
            nbytes = n_out * k_in * 2 + m * (k_in + n_out) * 2
            for n in args.sms:
                for impl, lin in (("cublas", F.linear), ("triton", gemm.linear)):
                    calls = [lambda w=w: lin(x, w) for w in ws]
                    r = on_lane(n, "gemm", calls, impl=impl, op=name, m=m, n=n_out, k=k_in, bytes=nbytes)
                    r["tbps"] = tbps(nbytes, r["median_ms"])
                    if impl == "triton":
                        r["config"] = gemm.config(m, n_out, k_in, r["sms"])
        del ws
        torch.cuda.empty_cache()

    # 4. whole decode step: one layer x 32 in one graph
    step_batches = (16, 128) if args.quick else (16, 64, 128)
    ctx = 4096
    for b in step_batches:
        layer = Layer(cfg, b, ctx)
        for n in args.sms:
            for impl, fn in (("stock", layer.stock), ("ours", layer.ours),
                             ("ours_triton_gemm", lambda: layer.ours(gemm.linear))):
                if impl == "ours_triton_gemm" and args.quick:
                    continue
                r = on_lane(n, "step", [fn] * cfg.layers, impl=impl, batch=b, ctx=ctx)
                r["step_ms"] = r["median_ms"] * cfg.layers  # per-call time x 32 layers
        del layer
        torch.cuda.empty_cache()
    part.close()
    return rows, summarize(rows, args.sms, fi_status)


def _get(rows, **match):
    return [r for r in rows if all(r.get(k) == v for k, v in match.items()) and "error" not in r]


def summarize(rows: list[dict], sms_list, fi_status: str) -> dict:
    full = max(sms_list)
    s: dict = {"flashinfer": fi_status}
    for n in sms_list:
        ours = _get(rows, kind="attention", impl="ours", sms_asked=n)
        sdpa = _get(rows, kind="attention", impl="sdpa", sms_asked=n)
        if ours:
            s[f"attention_pct_of_copy_min@{n}"] = round(min(r["pct_of_copy"] for r in ours), 1)
            s[f"attention_pct_of_copy_median@{n}"] = round(statistics.median(r["pct_of_copy"] for r in ours), 1)
            s[f"attention_speedup_vs_sdpa_geomean@{n}"] = round(_geomean(
                [a["median_ms"] / o["median_ms"] for o in ours for a in sdpa
                 if (a["batch"], a["ctx"]) == (o["batch"], o["ctx"])]), 3)
        cub, tri = _get(rows, kind="gemm", impl="cublas", sms_asked=n), _get(rows, kind="gemm", impl="triton", sms_asked=n)
        pairs = [c["median_ms"] / t["median_ms"] for c in cub for t in tri if (c["op"], c["m"]) == (t["op"], t["m"])]
        if pairs:
            s[f"gemm_triton_speedup_vs_cublas_geomean@{n}"] = round(_geomean(pairs), 3)
    for st in _get(rows, kind="step", impl="stock", sms_asked=full):
        b = st["batch"]
        for ours in _get(rows, kind="step", impl="ours", batch=b):
            s[f"step_b{b}_ours@{ours['sms_asked']}_over_stock@{full}"] = round(ours["step_ms"] / st["step_ms"], 3)
    return s


def _geomean(xs) -> float:
    xs = list(xs)
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    copy = _get(rows, kind="copy", impl="persistent")
    ax.plot([r["sms"] for r in copy], [r["tbps"] for r in copy], "k--", label="copy")
    shapes = sorted({(r["batch"], r["ctx"]) for r in _get(rows, kind="attention")})
    pick = [sh for sh in shapes if sh[0] * sh[1] == max(b * c for b, c in shapes)][:1] + shapes[:1]
    for impl, style in (("ours", "-o"), ("sdpa", "-s"), ("flashinfer", "-^")):
        for b, c in pick:
            rr = _get(rows, kind="attention", impl=impl, batch=b, ctx=c)
            if rr:
                ax.plot([r["sms"] for r in rr], [r["tbps"] for r in rr], style, label=f"{impl} b{b} ctx{c}")
    ax.set(xlabel="SMs", ylabel="TB/s", title="decode attention bandwidth")
    ax.legend(fontsize=7)
    ax = axes[1]
    for impl, style in (("stock", "-s"), ("ours", "-o"), ("ours_triton_gemm", ":o")):
        for b in sorted({r["batch"] for r in _get(rows, kind="step")}):
            rr = _get(rows, kind="step", impl=impl, batch=b)
            if rr:
                ax.plot([r["sms"] for r in rr], [r["step_ms"] for r in rr], style, label=f"{impl} b{b}")
    ax.set(xlabel="SMs", ylabel="ms / decode step (32 layers)", title="decode step", yscale="log")
    ax.legend(fontsize=7)
    ax = axes[2]
    for op in sorted({r["op"] for r in _get(rows, kind="gemm")}):
        for m in sorted({r["m"] for r in _get(rows, kind="gemm")}):
            cub, tri = _get(rows, kind="gemm", impl="cublas", op=op, m=m), _get(rows, kind="gemm", impl="triton", op=op, m=m)
            ax.plot([r["sms"] for r in cub], [c["median_ms"] / t["median_ms"] for c, t in zip(cub, tri)], "-o", label=f"{op} m{m}", ms=3)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(xlabel="SMs", ylabel="cuBLAS time / Triton time", title="split-K GEMM vs cuBLAS")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict], summary: dict) -> str:
    lines = [f"{'kind':<10}{'impl':<18}{'shape':<22}{'sms':>5}{'ms':>10}{'TB/s':>8}{'%copy':>7}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['kind']:<10}{r['impl']:<18}error: {r['error'][:60]}")
            continue
        shape = {"attention": lambda: f"b{r['batch']} ctx{r['ctx']}", "gemm": lambda: f"{r['op']} m{r['m']}",
                 "step": lambda: f"b{r['batch']} ctx{r['ctx']} x32", "copy": lambda: "1 GiB"}[r["kind"]]()
        ms = r.get("step_ms", r["median_ms"])
        tb = f"{r['tbps']:.2f}" if "tbps" in r else ""
        pct = f"{r['pct_of_copy']:.0f}" if "pct_of_copy" in r else ""
        lines.append(f"{r['kind']:<10}{r.get('impl', ''):<18}{shape:<22}{r['sms']:>5}{ms:>10.3f}{tb:>8}{pct:>7}")
    lines.append("summary:")
    lines += [f"  {k}: {v}" for k, v in summary.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes (about a minute)")
    p.add_argument("--sms", type=lambda s: tuple(int(x) for x in s.split(",")), default=SMS,
                   help="SM counts, comma separated (default 16,28,36,52,132)")
    p.add_argument("--backend", default="green", help="partition backend (default green)")
    p.add_argument("--max-tokens", type=int, default=1 << 20,
                   help="skip attention shapes with batch x ctx above this (KV memory)")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: bench_decode.py needs a CUDA GPU (an H100 for the reference numbers); nothing measured")
        return 0
    from bullet_kernels import results

    t0 = time.time()
    rows, summary = run(args)
    summary["wall_s"] = round(time.time() - t0, 1)
    path = results.write("decode", rows, summary, args.out_dir)
    plot(rows, path.with_suffix(".png"))
    print(table(rows, summary))
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
