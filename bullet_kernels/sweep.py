"""SM sweep: prefill throughput and decode step latency of a model against partition size.

For each SM count the engine's :class:`~bullet_kernels.engine.ModelRunner` captures the model's
graphs (prefill per layer group, decode per batch) on a verified one-lane partition of that many
SMs, and each step is replayed there and timed with CUDA events on the lane's stream. Every row
carries its per-replay samples, the lane's own measured copy and GEMM peaks with the step's
roofline, and the SM clock, power and throttle reasons sampled while it ran
(:mod:`bullet_kernels.measure`). MFU (prefill) and bandwidth share (decode) are against peaks
measured on the whole GPU at the start of the run.

    bullet sweep            # llama-3.1-8b preset, random weights, green partitions
    bullet sweep --quick    # fewer SM counts

The option parsing lives in ``cli.py``; ``bench/test_sm_sweep.py`` drives the same
:class:`ModelSweep` under pytest-benchmark.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path
from typing import Any

from . import results
from .device import describe_state
from .measure import EventTimer, GpuMonitor, measured_peaks, roofline_fields

FULL_SMS = tuple(range(8, 129, 8))
QUICK_SMS = (16, 32, 48, 64, 96)
LANE = "main"  # the one lane of each sweep partition


@dataclasses.dataclass(frozen=True)
class Workload:
    """One timed step: a prefill of ``size`` tokens or a decode step of ``size`` sequences."""

    phase: str
    size: int

    @property
    def name(self) -> str:
        return "prefill" if self.phase == "prefill" else f"decode-b{self.size}"


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """What to sweep. Defaults are those of ``bullet sweep``."""

    preset: str = "llama-3.1-8b"
    prompt: int = 2048
    decode_batch: tuple[int, ...] = (32, 128)
    context: int = 1024
    groups: int = 4
    reps: int = 5
    backend: str = "green"
    page_size: int = 16

    def __post_init__(self):
        from .models.presets import PRESETS
        from .partition import BACKENDS

        object.__setattr__(self, "decode_batch", tuple(self.decode_batch))
        for name in ("prompt", "context", "groups", "reps", "page_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sweep {name} must be a positive int, got {value!r}")
        if not self.decode_batch or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.decode_batch):
            raise ValueError(f"sweep decode_batch must be positive ints, got {self.decode_batch!r}")
        if len(set(self.decode_batch)) != len(self.decode_batch):
            raise ValueError(f"sweep decode_batch lists a batch twice: {self.decode_batch}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown partition backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")

    @classmethod
    def from_args(cls, args) -> "SweepPlan":
        """From ``bullet sweep``'s parsed options (no GPU needed: validates only)."""
        return cls(preset=args.preset, prompt=args.prompt, decode_batch=tuple(sorted(args.decode_batch)),
                   context=args.context, groups=args.groups, reps=args.reps, backend=args.backend)

    @property
    def max_context(self) -> int:
        return max(self.prompt, self.context + 1) + 64

    def kv_pages(self) -> int:
        """Pages for one prompt plus every decode sequence (context + the step's token)."""
        per_seq = -(-(self.context + 1) // self.page_size)
        spare = 2  # room for a padding page the cache may keep for padded rows
        return -(-self.prompt // self.page_size) + sum(self.decode_batch) * per_seq + spare

    def workloads(self) -> list[Workload]:
        return [Workload("prefill", self.prompt), *(Workload("decode", b) for b in sorted(self.decode_batch))]

    def rounds(self, workload: Workload) -> int:
        """Timed replays: decode steps are short, so four times as many."""
        return self.reps * (4 if workload.phase == "decode" else 1)


def lane_split(sms: int):
    """The one-lane split a sweep measures ``sms`` SMs on."""
    from .partition import SMSplit

    return SMSplit(**{LANE: sms})


def sm_counts(quick: bool, device_sms: int) -> list[int]:
    """The partition sizes to sweep (those below the GPU's count) and then the whole GPU."""
    return [n for n in (QUICK_SMS if quick else FULL_SMS) if n < device_sms] + [device_sms]


def model_costs(config, workload: Workload, context: int, dtype_bytes: int = 2) -> dict:
    """FLOPs a step computes and bytes it must move at least (weights once; the KV it reads or
    writes), for the roofline: a Llama-family model, linear layers and attention."""
    h, layers = config.hidden_size, config.num_layers
    per_layer = h * (config.q_size + 2 * config.kv_size) + config.q_size * h + 3 * h * config.intermediate_size
    linear_params = layers * per_layer
    weight_bytes = (linear_params + config.vocab_size * h) * dtype_bytes
    kv_token_bytes = layers * 2 * config.kv_size * dtype_bytes
    qk_pv = 4 * config.num_heads * config.head_dim * layers  # FLOPs per (query, key) pair
    if workload.phase == "prefill":
        t = workload.size
        flops = 2 * linear_params * t + qk_pv * t * t / 2 + 2 * h * config.vocab_size
        return {"flops": flops, "bytes": weight_bytes + t * kv_token_bytes}
    b = workload.size
    flops = 2 * (linear_params + config.vocab_size * h) * b + qk_pv * b * context
    return {"flops": flops, "bytes": weight_bytes + b * context * kv_token_bytes}


@dataclasses.dataclass
class LaneRun:
    """One captured partition of the sweep: where its graphs replay and what it can draw."""

    sms_asked: int
    placement: Any
    stream: Any
    granted: int
    observed: int
    peaks: dict


class ModelSweep:
    """A random-weight model, its engine runner and the planned steps, swept over lanes.

    ``lane(sms)`` captures on a partition of ``sms`` SMs (dropping the previous lane's graphs);
    ``timer``/``row`` time one workload there (pytest-benchmark drives the timer's rounds);
    ``measure`` does both for ``bullet sweep``.
    """

    def __init__(self, plan: SweepPlan, partitioner):
        import torch

        from .config import EngineConfig
        from .engine import ModelRunner
        from .models.presets import random_model

        self.plan = plan
        self.partitioner = partitioner
        self.peaks = measured_peaks()  # the whole GPU, before anything else holds memory
        torch.manual_seed(0)
        self.model = random_model(plan.preset, device="cuda", dtype=torch.bfloat16, max_context=plan.max_context)
        self.config = self.model.config
        engine_config = EngineConfig(
            page_size=plan.page_size, decode_buckets=tuple(sorted(plan.decode_batch)), prefill_buckets=(plan.prompt,),
            prefill_max_seqs=1, layer_groups=plan.groups, backend=plan.backend, kv_num_pages=plan.kv_pages(),
        )
        self.runner = ModelRunner(self.model, engine_config, partitioner=partitioner)
        self.runner.kv_cache.randomize_(std=0.5, seed=0)  # never time attention on zeros
        self.batches = self.plan_batches()
        self.current: LaneRun | None = None
        self.capture_rows: list[dict] = []

    def plan_batches(self) -> dict[str, tuple]:
        """``{workload name: (input ids, batch)}``: one prompt; ``b`` sequences of ``context``
        cached tokens each taking one decode step."""
        import torch

        gen = torch.Generator().manual_seed(0)
        vocab, plan = self.config.vocab_size, self.plan
        prompt = torch.randint(0, vocab, (plan.prompt,), generator=gen).tolist()
        self.runner.reserve([("prompt", prompt)])
        out = {"prefill": self.runner.plan_prefill([("prompt", prompt)])}
        for b in plan.decode_batch:
            rids = [f"decode-b{b}-{i}" for i in range(b)]
            context = torch.randint(0, vocab, (plan.context + 1,), generator=gen).tolist()
            self.runner.reserve([(rid, context) for rid in rids])
            out[Workload("decode", b).name] = self.runner.plan_decode(rids, [context[-1]] * b)
        return out

    def lane(self, sms: int) -> LaneRun:
        """The captured lane of ``sms`` SMs (captured now unless it is the current one)."""
        if self.current is not None and self.current.sms_asked == sms:
            return self.current
        self.release()
        from .engine import Placement

        split = lane_split(sms)
        pset = self.partitioner.get(split)
        lane = pset.lane(LANE)
        with pset.use(LANE):
            peaks = measured_peaks(lane.granted)
        placement = Placement(split, LANE)
        cap = self.runner.capture(placement, phases=("decode", "prefill"))
        self.current = LaneRun(sms, placement, lane.stream, lane.granted, len(lane.observed_sms), peaks)
        self.capture_rows.append({
            "phase": "capture", "sms_asked": sms, "sms_granted": lane.granted, "sms_observed": len(lane.observed_sms),
            "graphs": cap["graphs"], "seconds": cap["seconds"], "memory_bytes": cap["memory_bytes"],
            **{f"lane_{k}": v for k, v in peaks.items()},
        })
        return self.current

    def timer(self, workload: Workload, run: LaneRun) -> EventTimer:
        """A timer replaying ``workload``'s graphs on the lane's stream, one replay per round."""
        ids, batch = self.batches[workload.name]
        step = self.runner.prepare(ids, batch, run.placement)
        if step.eager_reason:  # the lane was captured: an eager step here would be a bug, not data
            raise RuntimeError(f"{workload.name} on {run.placement} has no graph: {step.eager_reason}")
        return EventTimer(lambda: step.launch(stream=run.stream), run.stream)

    def row(self, workload: Workload, run: LaneRun, stats: dict, gpu: dict) -> dict:
        costs = model_costs(self.config, workload, self.plan.context)
        ms = stats["median_ms"]
        row = {
            "phase": workload.phase, "workload": workload.name,
            "sms_asked": run.sms_asked, "sms_granted": run.granted, "sms_observed": run.observed,
            **({"tokens": workload.size} if workload.phase == "prefill" else {"batch": workload.size, "context": self.plan.context}),
            **stats, **roofline_fields(ms, costs["bytes"], costs["flops"], run.peaks), **gpu,
        }
        if workload.phase == "prefill":
            row["tok_s"] = workload.size / (ms * 1e-3)
            row["mfu"] = costs["flops"] / (ms * 1e-3) / (self.peaks["gemm_tflops"] * 1e12)
        else:
            row["bw_frac"] = costs["bytes"] / (ms * 1e-3) / (self.peaks["copy_tbps"] * 1e12)
        return row

    def measure(self, workload: Workload, run: LaneRun) -> dict:
        timer = self.timer(workload, run)
        timer.warmup()
        with GpuMonitor() as gpu:
            stats = timer.run(self.plan.rounds(workload))
        return self.row(workload, run, stats, gpu.summary())

    def release(self) -> None:
        """Drop the current lane's graphs (a sweep holds one lane's graphs at a time)."""
        if self.current is None:
            return
        import torch

        self.runner.release_graphs(self.current.placement)
        self.current = None
        torch.cuda.empty_cache()

    def close(self) -> None:
        import torch

        self.current = None
        self.runner.close()
        self.runner = self.model = self.batches = None
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- summary, plot


def measured_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("phase") in ("prefill", "decode")]


def summarize(rows: list[dict]) -> dict:
    """Headline numbers: the whole-GPU step times and the smallest partition whose decode steps
    (every batch) are within 10% of the whole GPU's."""
    meas = measured_rows(rows)
    if not meas:
        return {}
    full = max(r["sms_granted"] for r in meas)
    at_full = {r["workload"]: r for r in meas if r["sms_granted"] == full}
    summary: dict = {"full_gpu_sms": full}
    if "prefill" in at_full:
        summary["full_gpu_prefill_tok_s"] = at_full["prefill"]["tok_s"]
        summary["full_gpu_prefill_mfu"] = at_full["prefill"]["mfu"]
    decode_names = sorted({r["workload"] for r in meas if r["phase"] == "decode"})
    for name in decode_names:
        if name in at_full:
            summary[f"full_gpu_{name}_ms"] = at_full[name]["median_ms"]
    for sms in sorted({r["sms_granted"] for r in meas}):
        mine = {r["workload"]: r["median_ms"] for r in meas if r["sms_granted"] == sms}
        if decode_names and all(n in mine and n in at_full and mine[n] <= 1.1 * at_full[n]["median_ms"] for n in decode_names):
            summary["smallest_sms_decode_within_10pct"] = sms
            break
    return summary


def row_text(rows: list[dict]) -> str:
    """One line for the rows of one SM count."""
    parts = []
    for r in rows:
        if r["phase"] == "prefill":
            parts.append(f"prefill {r['median_ms']:8.1f} ms {r['tok_s']:9.0f} tok/s MFU {r['mfu'] * 100:5.1f}%")
        else:
            parts.append(f"b{r['batch']} {r['median_ms']:7.2f} ms {r['tbps']:4.2f} TB/s")
    clock = rows[-1].get("sm_clock_mhz")
    clock_text = f"  {clock:.0f} MHz" if isinstance(clock, (int, float)) else ""
    return f"  {rows[0]['sms_granted']:4d} SMs  " + "  ".join(parts) + clock_text


def plot(rows: list[dict], path: str | Path, title: str) -> Path:
    """Prefill tokens/s and decode step latency against SMs, beside the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meas = measured_rows(rows)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    pre = sorted((r for r in meas if r["phase"] == "prefill"), key=lambda r: r["sms_granted"])
    a.plot([r["sms_granted"] for r in pre], [r["tok_s"] for r in pre], "o-")
    a.set(xlabel="SMs", ylabel="prefill tokens/s", title="prefill throughput")
    for batch in sorted({r["batch"] for r in meas if r["phase"] == "decode"}):
        dec = sorted((r for r in meas if r.get("batch") == batch), key=lambda r: r["sms_granted"])
        b.plot([r["sms_granted"] for r in dec], [r["median_ms"] for r in dec], "o-", label=f"batch {batch}")
    b.set(xlabel="SMs", ylabel="decode step ms", title="decode step latency")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return results.save_figure(fig, path, title)


# ------------------------------------------------------------------------------ bullet sweep


def run_extra(plan: SweepPlan) -> dict:
    """Run facts written beside the rows."""
    return {"model": plan.preset, "weights": "random bf16", "prompt_tokens": plan.prompt,
            "decode_context": plan.context, "decode_batches": list(plan.decode_batch),
            "layer_groups": plan.groups, "backend": plan.backend}


def main(args) -> int:
    """``bullet sweep``: reads ``args.preset, prompt, decode_batch, context, groups, reps, quick,
    out, backend``. Exit 1 without a GPU (nothing to measure)."""
    plan = SweepPlan.from_args(args)
    device, reason = describe_state()
    if device is None:
        print(f"bullet sweep: no GPU ({reason}); the sweep needs one. `bullet info` shows this machine.")
        return 1
    from .partition import Partitioner

    t0 = time.perf_counter()
    rows: list[dict] = []
    counts = sm_counts(args.quick, device.sm_count)
    with Partitioner(plan.backend) as parts:
        # Every lane is opened and verified before other GPU work: a green split first opened
        # after cuBLAS or Inductor work was seen running on an earlier split's SMs.
        for sms in counts:
            parts.get(lane_split(sms))
        sweep = ModelSweep(plan, parts)
        try:
            for sms in counts:
                run = sweep.lane(sms)
                mine = [sweep.measure(w, run) for w in plan.workloads()]
                rows += mine
                print(row_text(mine), flush=True)
            rows += sweep.capture_rows
            peaks = sweep.peaks
        finally:
            sweep.close()
    summary = {"peaks": peaks, **summarize(rows), "wall_s": time.perf_counter() - t0}
    path = results.write("sm-sweep", rows, summary, args.out, **run_extra(plan))
    png = plot(rows, path, f"{plan.preset} on {device.name} ({plan.backend} partitions)")
    print(f"results: {path}\nplot: {png}")
    print(json.dumps({k: v for k, v in summary.items() if k != "peaks"}, indent=1))
    return 0
