"""The partition roofline: what an N-SM lane can do, and what each kernel of a layer does on it.

For every SM count N, on one verified N-SM lane (``--bench-backend``, default green), in the
same run:

1. ``peaks``: the lane's copy bandwidth (a persistent copy sized to the lane) and bf16 GEMM peak
   (cuBLAS, 8192^3), with SM clock and power while they ran: the lane's roofline;
2. ``op``: every kernel of one decoder layer (:data:`bullet_kernels.costs.LAYER_OPS`, through
   the same dispatch the model uses) timed alone, against its own roofline
   ``max(bytes / copy_N, FLOPs / peak_N)`` (:func:`bullet_kernels.costs.layer_op_costs`);
3. ``layer``: the whole layer in one graph, against the sum of its kernels' rooflines (the
   roofline of a step that runs its kernels one after another) and against the sum of the
   kernels' measured times (the difference is launch gaps and tails); x layers = the step less
   embedding and LM head.

Decode at batch 1-256 and context 1k-16k, prefill at 512-8192 tokens. Every row carries the SM
clock and power sampled while it ran (NVML), so throttling shows in the data. A kernel whose
roofline is under :data:`LAUNCH_FLOOR_MS` is marked ``launch_bound``: at that size a launch
costs more than the work, and its percentage says little.

    python3 -m pytest bench/test_roofline.py -m gpu [--bench-size full] [--bench-sms 32,all]

Writes bench/results/roofline-<gpu>-<yyyymmdd>.json, .png and prints the table.
"""

from __future__ import annotations

import math
import statistics

import pytest

from bench.decode_layer import KeepLast
from bench.layer_ops import LayerOps
from bench.rows import select
from bullet_kernels import costs, measure
from bullet_kernels.models.presets import preset_config

BENCHMARK = "roofline"
MODEL = "llama-3.1-8b"
LAUNCH_FLOOR_MS = 0.004  # ~ one kernel launch inside a graph on Hopper
MAX_DECODE_TOKENS = 4 << 20  # batch x context above this is left out (16 GB of KV for one layer)
TARGET_PCT = 85  # issue: each decode kernel class and the step at >= 85% of the lane's roofline
OPS = costs.LAYER_OPS + ("layer",)


def decode_shapes(batches, contexts):
    return tuple((b, c) for b in batches for c in contexts if b * c <= MAX_DECODE_TOKENS)


GRID = {  # sms last: it varies fastest, so one shape's inputs serve every lane
    "quick": {
        "decode_shape": ((1, 4096), (16, 1024), (32, 4096), (64, 4096), (128, 2048), (256, 4096)),
        "prefill_shape": ((512, 512), (2048, 1024), (8192, 2048)),
        "op": OPS,
        "sms": (16, 32, 48, "all"),
    },
    "full": {
        "decode_shape": decode_shapes((1, 16, 32, 64, 128, 256), (1024, 4096, 16384)),
        "prefill_shape": ((512, 512), (1024, 1024), (2048, 1024), (4096, 1024), (4096, 4096), (8192, 2048),
                          (8192, 8192)),
        "op": OPS,
        "sms": (16, 24, 32, 40, 48, 64, 96, "all"),
    },
}

layers = KeepLast()  # the inputs of the latest shape


@pytest.fixture(scope="module", autouse=True)
def drop_inputs_after_module():
    yield
    layers.clear()


@pytest.mark.gpu
def test_peaks(benchmark, bench, recorder, sms):
    """The lane's copy and GEMM peaks, with the clock and power while they were measured."""
    lane = bench.lane(sms)
    peaks, gpu = bench.measure_peaks(benchmark, lane)
    recorder.add({"kind": "peaks", "sms_asked": sms, "sms": lane.granted, **peaks, **gpu})


def run(benchmark, bench, recorder, phase: str, shape, op: str, sms) -> None:
    rows, context = shape
    lane = bench.lane(sms)
    ops = layers.get((phase, rows, context), lambda: LayerOps(preset_config(MODEL), phase, rows, context))
    peaks = lane.peaks()
    base = {"phase": phase, "rows": rows, "context": context, "op": op}
    if op == "layer":
        row = bench.time_graph(benchmark, lane, [ops.layer] * 2)
        kernels = list(ops.costs.values())
        row.update(measure.roofline_fields(row["median_ms"], sum(k.bytes for k in kernels),
                                           sum(k.flops for k in kernels), peaks))
        row["sum_op_rooflines_ms"] = sum(measure.roofline_ms(k.bytes, k.flops, peaks) for k in kernels)
        row["pct_of_op_rooflines"] = 100 * row["sum_op_rooflines_ms"] / row["median_ms"]
        row["step_ms"] = row["median_ms"] * ops.config.num_layers
        recorder.add({"kind": "layer", **base, **row})
        return
    cost = ops.costs[op]
    row = bench.time_graph(benchmark, lane, ops.op_calls(op))
    row.update(measure.roofline_fields(row["median_ms"], cost.bytes, cost.flops, peaks))
    row["launch_bound"] = row["roofline_ms"] < LAUNCH_FLOOR_MS
    recorder.add({"kind": "op", **base, "op_kind": cost.kind, **row})


@pytest.mark.gpu
def test_decode(benchmark, bench, recorder, decode_shape, op, sms):
    run(benchmark, bench, recorder, "decode", decode_shape, op, sms)


@pytest.mark.gpu
def test_prefill(benchmark, bench, recorder, prefill_shape, op, sms):
    run(benchmark, bench, recorder, "prefill", prefill_shape, op, sms)


# --------------------------------------------------------------------------- summary, plot, table


def shape_name(r) -> str:
    return f"b{r['rows']} ctx{r['context']}" if r["phase"] == "decode" else f"{r['rows']} tok (seq {r['context']})"


def summarize(rows: list[dict]) -> dict:
    """Per lane: its peaks; per phase and lane: each kernel class's lowest and median share of its
    roofline (launch-bound kernels left out), the layers' share of the sum of their kernels'
    rooflines, and how many layers reach the issue's 85%."""
    s: dict = {}
    for r in select(rows, kind="peaks"):
        s[f"copy_tbps@{r['sms']}"] = round(r["copy_tbps"], 3)
        s[f"gemm_tflops@{r['sms']}"] = round(r["gemm_tflops"], 1)
    for phase in costs.PHASES:
        for n in sorted({r["sms"] for r in select(rows, phase=phase)}):
            for kind in costs.KINDS:
                pct = [r["pct_of_roofline"] for r in select(rows, kind="op", phase=phase, sms=n, op_kind=kind)
                       if not r["launch_bound"]]
                if pct:
                    s[f"{phase}_{kind}_pct_min@{n}"] = round(min(pct), 1)
                    s[f"{phase}_{kind}_pct_median@{n}"] = round(statistics.median(pct), 1)
            lay = select(rows, kind="layer", phase=phase, sms=n)
            if lay:
                s[f"{phase}_layer_pct_of_op_rooflines_min@{n}"] = round(min(r["pct_of_op_rooflines"] for r in lay), 1)
                s[f"{phase}_layers_at_{TARGET_PCT}pct@{n}"] = (
                    f"{sum(r['pct_of_op_rooflines'] >= TARGET_PCT for r in lay)} of {len(lay)}")
    full = max((r["sms"] for r in select(rows, kind="layer")), default=None)
    for r in select(rows, kind="layer", phase="decode"):
        whole = select(rows, kind="layer", phase="decode", rows=r["rows"], context=r["context"], sms=full)
        if whole and r["sms"] != full:
            s[f"decode_b{r['rows']}_ctx{r['context']}@{r['sms']}_over_full"] = round(r["median_ms"] / whole[0]["median_ms"], 3)
    return s


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    peaks = sorted(select(rows, kind="peaks"), key=lambda r: r["sms"])
    ax = axes[0]
    if peaks:
        n = [r["sms"] for r in peaks]
        ax.plot(n, [r["copy_tbps"] / peaks[-1]["copy_tbps"] for r in peaks], "-o", label="copy TB/s")
        ax.plot(n, [r["gemm_tflops"] / peaks[-1]["gemm_tflops"] for r in peaks], "-s", label="GEMM TFLOP/s")
        ax.plot(n, [x / n[-1] for x in n], "k:", label="SM share")
    ax.set(xlabel="SMs", ylabel="fraction of the whole GPU", title="lane peaks")
    ax.legend(fontsize=7)
    for ax, phase in zip(axes[1:], costs.PHASES):
        shapes = sorted({(r["rows"], r["context"]) for r in select(rows, kind="layer", phase=phase)},
                        key=lambda sh: sh[0] * sh[1])
        for sh in shapes:
            lay = sorted(select(rows, kind="layer", phase=phase, rows=sh[0], context=sh[1]), key=lambda r: r["sms"])
            ax.plot([r["sms"] for r in lay], [r["pct_of_op_rooflines"] for r in lay], "-o", ms=3, label=shape_name(lay[0]))
        ax.axhline(TARGET_PCT, color="k", lw=0.8, ls="--")
        ax.set(xlabel="SMs", ylabel="% of the sum of kernel rooflines", title=f"{phase} layer", ylim=(0, 105))
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict], summary: dict) -> str:
    """% of roofline per kernel (rows) and lane (columns), one block per shape; ``*``: launch-bound."""
    lanes = sorted({r["sms"] for r in select(rows, kind="op")} | {r["sms"] for r in select(rows, kind="layer")})
    lines = []
    for r in select(rows, kind="peaks"):
        lines.append(f"lane {r['sms']:>3} SMs: copy {r['copy_tbps']:.2f} TB/s, GEMM {r['gemm_tflops']:.0f} TFLOP/s, "
                     f"SM clock {measure_text(r, 'sm_clock_mhz')} MHz, power {measure_text(r, 'power_w')} W")
    for phase in costs.PHASES:
        for sh in sorted({(r["rows"], r["context"]) for r in select(rows, phase=phase)}):
            pick = select(rows, phase=phase, rows=sh[0], context=sh[1])
            lines.append(f"{phase} {shape_name(pick[0])}: % of roofline (ms) per lane")
            lines.append(f"  {'kernel':<14}" + "".join(f"{n:>16}" for n in lanes))
            for op in OPS:
                cells = {r["sms"]: r for r in pick if r["op"] == op}
                if cells:
                    lines.append(f"  {op:<14}" + "".join(f"{cell_text(cells.get(n)):>16}" for n in lanes))
    lines += ["summary:"] + [f"  {k}: {v}" for k, v in summary.items()]
    return "\n".join(lines)


def cell_text(r) -> str:
    if r is None:
        return "-"
    pct = r["pct_of_op_rooflines"] if r["kind"] == "layer" else r["pct_of_roofline"]
    return f"{pct:.0f}{'*' if r.get('launch_bound') else ''} ({r['median_ms']:.3f})"


def measure_text(r, key) -> str:
    v = r.get(key)
    return f"{v:.0f}" if isinstance(v, (int, float)) and not math.isnan(v) else "n/a"
