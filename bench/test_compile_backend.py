"""``torch.compile(backend="bullet")`` on a compact gpt-fast-style model.

1. Replay overhead: the same decode-shaped call through backend="bullet" (whole GPU), through
   PyTorch's backend="cudagraphs" (it replays eager aten kernels, so it also measures kernel
   quality) and through Inductor's own CUDA graphs (mode="reduce-overhead": the same Inductor
   kernels, so the difference is graph overhead alone). Host time per call, GPU drained.
2. Co-location: one prefill call and N decode calls. Baseline: backend="inductor" one after the
   other; ours: backend="bullet" with the prefill on the prefill lane and the decode steps on
   the decode lane of an SM split (``bullet_kernels.on_lane``, not joined, so they overlap), for
   several splits, and sequentially on the whole GPU.

The model attends over a KV context held in buffers (read-only: a benchmark model, decode steps
do not append), which keeps decode memory-bound as real decode is.

    python3 -m pytest bench/test_compile_backend.py -m gpu [--bench-size full]

Writes bench/results/compile-<gpu>-<yyyymmdd>.json.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bullet_kernels
from bullet_kernels import SMSplit

BENCHMARK = "compile"
DECODE_BATCH, PROMPT_TOKENS, VOCAB = 64, 2048, 32000
SIZES = {
    "quick": {"iters": 20, "decode_steps": 4, "splits": ("prefill=96,decode=36", "prefill=104,decode=28")},
    "full": {"iters": 50, "decode_steps": 4,
             "splits": ("prefill=96,decode=36", "prefill=104,decode=28", "prefill=112,decode=20")},
}
COLOCATED = "colocated-"  # mode prefix: prefill and decode on the two lanes of a split
REPLAY_BACKENDS = ("bullet", "cudagraphs", "inductor-reduce-overhead")
GRID = {size: {"backend": REPLAY_BACKENDS,
               "mode": ("inductor-sequential", "bullet-sequential", *(COLOCATED + s for s in cfg["splits"]))}
        for size, cfg in SIZES.items()}
MAX_REL_ERR = 0.05  # bf16 through 8 layers; a stale or wrong replay is off by ~1


def splits_of(params: dict) -> list[SMSplit]:
    """The split a co-located mode runs on (conftest opens them all before any GPU work)."""
    mode = params.get("mode", "")
    return [SMSplit.parse(mode.removeprefix(COLOCATED))] if mode.startswith(COLOCATED) else []


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int, batch: int, ctx: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm1, self.norm2 = torch.nn.RMSNorm(dim), torch.nn.RMSNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.o = torch.nn.Linear(dim, dim, bias=False)
        self.up = torch.nn.Linear(dim, 2 * 4 * dim, bias=False)
        self.down = torch.nn.Linear(4 * dim, dim, bias=False)
        shape = (batch, heads, ctx, self.head_dim)
        self.register_buffer("k_ctx", torch.randn(shape) * 0.1, persistent=False)
        self.register_buffer("v_ctx", torch.randn(shape) * 0.1, persistent=False)

    def forward(self, x: torch.Tensor, decode: bool) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, self.head_dim).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        if decode:  # one new token attends over the cached context
            k = torch.cat([self.k_ctx[:b], k], dim=2)
            v = torch.cat([self.v_ctx[:b], v], dim=2)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=not decode)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        gate, up = self.up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class TinyGPT(torch.nn.Module):
    def __init__(self, dim=2048, layers=8, heads=16, vocab=VOCAB, batch=DECODE_BATCH, ctx=2048):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads, batch, ctx) for _ in range(layers))
        self.norm = torch.nn.RMSNorm(dim)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, decode: bool = False) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, decode)
        return self.lm_head(self.norm(x[:, -1]))


class Setup:
    """The model, its inputs and its compiled variants (each compiled on first use)."""

    def __init__(self, bench):
        torch.manual_seed(0)
        self.bench = bench
        self.sizes = SIZES[bench.size]
        self.model = TinyGPT().cuda().to(torch.bfloat16).eval()
        self.prompt = torch.randint(0, VOCAB, (1, PROMPT_TOKENS), device="cuda")
        self.step = torch.randint(0, VOCAB, (DECODE_BATCH, 1), device="cuda")
        self.compiled = {}

    def fn(self, backend: str):
        if backend not in self.compiled:
            if backend == "inductor-reduce-overhead":
                self.compiled[backend] = torch.compile(self.model, mode="reduce-overhead", dynamic=False)
            else:
                self.compiled[backend] = torch.compile(self.model, backend=backend, dynamic=False)
        return self.compiled[backend]

    def sequential(self, backend: str):
        fn = self.fn(backend)

        def run():
            fn(self.prompt)
            for _ in range(self.sizes["decode_steps"]):
                fn(self.step, decode=True)
        return run

    def colocated(self, split: SMSplit):
        fn, parts = self.fn("bullet"), self.bench.partitioner

        def run():
            with bullet_kernels.on_lane("prefill", split, partitioner=parts, join=False):
                fn(self.prompt)
            with bullet_kernels.on_lane("decode", split, partitioner=parts, join=False):
                for _ in range(self.sizes["decode_steps"]):
                    fn(self.step, decode=True)
            torch.cuda.synchronize()
        return run


@pytest.fixture(scope="module")
def setup(bench, recorder):
    recorder.extra.update(model="TinyGPT dim2048 L8 bf16", decode_batch=DECODE_BATCH, prompt_tokens=PROMPT_TOKENS)
    return Setup(bench)


@pytest.mark.gpu
def test_replay(benchmark, bench, recorder, setup, backend):
    with torch.no_grad():
        fn = setup.fn(backend)
        expected = setup.model(setup.step, decode=True).float()
        for _ in range(3):  # compile, capture, warm
            out = fn(setup.step, decode=True)
        err = ((out.float() - expected).norm() / expected.norm()).item()
        row = bench.time_host(benchmark, lambda: fn(setup.step, decode=True), rounds=setup.sizes["iters"])
    recorder.add({"measure": "replay", "backend": backend, "rel_err_vs_eager": err, **row})
    assert err < MAX_REL_ERR, f"backend {backend!r} replay differs from eager by {err:.3g} (relative)"


@pytest.mark.gpu
def test_mix(benchmark, bench, recorder, setup, mode):
    with torch.no_grad():
        if mode.startswith(COLOCATED):
            fn = setup.colocated(splits_of({"mode": mode})[0])
        else:
            fn = setup.sequential("inductor" if mode == "inductor-sequential" else "bullet")
        try:
            for _ in range(3):
                fn()
        except bullet_kernels.BulletError as exc:  # e.g. a partition that failed verification
            recorder.add({"measure": "mix", "mode": mode, "error": str(exc)})
            pytest.skip(f"{mode}: refused: {exc}")
        row = bench.time_host(benchmark, fn, rounds=setup.sizes["iters"])
    recorder.add({"measure": "mix", "mode": mode, "decode_steps": setup.sizes["decode_steps"], **row})


def summarize(rows: list[dict]) -> dict:
    replay = {r["backend"]: r["median_ms"] for r in rows if r["measure"] == "replay"}
    mix = {r["mode"]: r["median_ms"] for r in rows if r["measure"] == "mix" and "median_ms" in r}
    summary = {}
    if "bullet" in replay and "cudagraphs" in replay:
        summary["bullet_replay_vs_cudagraphs"] = replay["bullet"] / replay["cudagraphs"] - 1
    if "bullet" in replay and "inductor-reduce-overhead" in replay:
        summary["bullet_replay_vs_inductor_reduce_overhead"] = replay["bullet"] / replay["inductor-reduce-overhead"] - 1
    colocated = [k for k in mix if k.startswith(COLOCATED)]
    if colocated and "inductor-sequential" in mix:
        best = min(colocated, key=mix.get)
        summary["best_colocated"] = best
        summary["best_colocated_speedup_vs_inductor_sequential"] = mix["inductor-sequential"] / mix[best]
    return summary


def table(rows: list[dict], summary: dict) -> str:
    lines = [f"  {r['measure']:6s} {r.get('backend') or r.get('mode'):38s} median {r['median_ms']:8.3f} ms  "
             f"p90 {r['p90_ms']:8.3f} ms" for r in rows if "median_ms" in r]
    return "\n".join(lines + [f"  {k}: {v}" for k, v in summary.items()])
