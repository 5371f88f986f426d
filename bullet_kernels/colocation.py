"""Co-location benchmark (``bullet bench``): prefill beside decode, every mode in one run.

A **mix** is one prompt prefilled beside a few steps of a running decode batch:

- A: a 4096-token prompt beside 6 decode steps of batch 128 at 2048 tokens of context;
- B: a 2048-token prompt beside 6 decode steps of batch 32 at 1024 tokens of context.

Every mode does the same work (the whole prompt, every decode step) and is timed from the
first launch to the last:

- ``sequential``: the prefill, then the decode steps, each on the whole GPU;
- ``chunked-<C>``: Sarathi-style chunked prefill: each decode step fused with a chunk of ``C``
  prompt tokens into one forward (prefill-path graphs on the whole GPU);
- ``static-<split>``: the prefill's layer groups on the prefill lane and the decode steps on the
  decode lane of one split, for the whole mix;
- ``static-<split>+gemm@<gemm-split>``: as ``static-<split>``, but the decode steps' graphs run
  their GEMMs (qkv, o_proj, gate_up, down, lm_head) on the *decode* lane of ``<gemm-split>``, a
  wider lane (``+gemm@whole-gpu``: on every SM), and everything else on ``<split>``'s decode lane
  (kernel-level placement, docs/kernel-placement.md). The GEMM lane overlaps the prefill lane,
  so whether decode gains more than prefill loses is what these rows measure: each row is
  compared with its plain ``static-<split>`` (``summary[mix]["gemm_placement"]``), and its
  decode logits must equal that mode's within the bf16 tolerance. Pairs come from
  ``BenchPlan.gemm_lanes`` (default: home 100/32 with GEMMs on 68/64's decode lane, home 84/48
  with GEMMs on 52/80's); no profile holds such graphs, so simulations leave them out;
- ``orchestrated``: the temporal orchestrator (:mod:`bullet_kernels.orchestrate`): the SLO
  policy picks the split (decode's step within ``tpot_factor`` x its whole-GPU step), and a lane
  whose partner has finished takes the whole GPU.

Ratios are against the better of sequential and the best chunked mode, with the SM-time bound
(what perfect co-location could reach) and the fraction of it reached. On a machine without a
GPU the same plans run through the latency estimator on the shipped profile: a simulation,
labelled so in every row (chunked prefill and kernel placement need timings no profile holds,
so they are left out there).
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import time
from pathlib import Path

from . import results
from .orchestrate.estimator import Estimator
from .orchestrate.planner import Launch, MixWork, makespan, plan_mix, sm_time_bound
from .orchestrate.policy import DECODE, PREFILL, SLOPolicy, StaticPolicy
from .orchestrate.profiler import DEFAULT_SPLITS  # the splits the shipped profiles measured
from .partition import SMSplit

MIXES = {
    "A": MixWork(prompt_tokens=4096, decode_batch=128, context=2048, decode_steps=6),
    "B": MixWork(prompt_tokens=2048, decode_batch=32, context=1024, decode_steps=6),
}
# The sweep: prompt sizes against a small and a large decode batch (``p<tokens>-b<batch>-c<context>``).
SWEEP_MIXES = tuple(f"p{t}-b{b}-c{c}" for t in (1024, 2048, 4096) for b, c in ((32, 1024), (128, 2048)))
MIX_NAME = re.compile(r"p(\d+)-b(\d+)-c(\d+)")
CHUNKS = (512, 1024, 2048)
TPOT_FACTOR = 1.5  # the co-located decode step may take this multiple of its whole-GPU step
SEQUENTIAL, ORCHESTRATED = "sequential", "orchestrated"
WHOLE_GPU_NAME = "whole-gpu"  # a GEMM lane of every SM (an ordinary stream) in mode names
# Kernel-level placement: (home split, GEMM split); the decode steps' GEMMs run on the GEMM
# split's decode lane. Both splits are candidate splits of the shipped profiles, so opened anyway.
DEFAULT_GEMM_LANES = (("prefill=100,decode=32", "prefill=68,decode=64"),
                      ("prefill=84,decode=48", "prefill=52,decode=80"))
GEMM_MODE = re.compile(r"static-(?P<home>.+)\+gemm@(?P<gemm>.+)")


def gemm_mode_name(home: SMSplit, gemm: SMSplit | None) -> str:
    """``static-prefill100-decode32+gemm@prefill68-decode64`` (``@whole-gpu`` for every SM)."""
    return f"static-{home.key}+gemm@{WHOLE_GPU_NAME if gemm is None else gemm.key}"


def _split_or_whole(value) -> SMSplit | None:
    if value is None or value == WHOLE_GPU_NAME:
        return None
    return SMSplit.parse(value) if isinstance(value, str) else value


@dataclasses.dataclass(frozen=True)
class BenchPlan:
    preset: str = "llama-3.1-8b"
    mixes: tuple[str, ...] = ("A", "B")
    splits: tuple[SMSplit, ...] = tuple(SMSplit.parse(s) for s in DEFAULT_SPLITS)
    chunks: tuple[int, ...] = CHUNKS
    reps: int = 5
    backend: str = "green"
    tpot_factor: float = TPOT_FACTOR
    # (home split, GEMM split or None for the whole GPU) per kernel-placement mode. None: the
    # DEFAULT_GEMM_LANES pairs whose home split is among ``splits``; pairs given explicitly must
    # name a home split of ``splits`` (their plain static mode is what they are compared with).
    gemm_lanes: tuple[tuple[SMSplit, SMSplit | None], ...] | None = None

    def __post_init__(self):
        from .orchestrate.policy import check_splits

        if not self.mixes:
            raise ValueError(f"no mix given; mixes: {', '.join(MIXES)} or p<tokens>-b<batch>-c<context>")
        for m in self.mixes:
            mix_work(m)
        object.__setattr__(self, "splits", tuple(check_splits(self.splits)))
        object.__setattr__(self, "gemm_lanes", self._checked_gemm_lanes())
        if not self.tpot_factor > 1:
            raise ValueError(f"tpot_factor must be > 1 (a multiple of the whole-GPU decode step), got {self.tpot_factor}")
        if self.reps < 1 or any(c < 1 for c in self.chunks):
            raise ValueError(f"reps and chunk sizes must be >= 1, got reps {self.reps} and chunks {self.chunks}")

    def _checked_gemm_lanes(self) -> tuple[tuple[SMSplit, SMSplit | None], ...]:
        from .orchestrate.policy import check_splits

        if self.gemm_lanes is None:
            pairs = [(SMSplit.parse(h), SMSplit.parse(g)) for h, g in DEFAULT_GEMM_LANES]
            return tuple((h, g) for h, g in pairs if h in self.splits)
        out = []
        for pair in self.gemm_lanes:
            if len(pair) != 2:
                raise ValueError(f"gemm_lanes takes (home split, GEMM split) pairs, got {pair!r}")
            home, gemm = _split_or_whole(pair[0]), _split_or_whole(pair[1])
            if home is None or home not in self.splits:
                raise ValueError(
                    f"gemm_lanes pair {pair!r}: the home split must be one of the plan's splits "
                    f"({', '.join(s.key for s in self.splits)}): its static mode is the comparison")
            if gemm is not None:
                check_splits([gemm])
                if gemm == home:
                    raise ValueError(f"gemm_lanes pair {pair!r}: GEMMs on the home split's own decode lane are "
                                     "the plain static mode; name a split with a wider decode lane or 'whole-gpu'")
            out.append((home, gemm))
        return tuple(dict.fromkeys(out))

    @property
    def all_splits(self) -> tuple[SMSplit, ...]:
        """Every split a run opens (up front, before other GPU work): the candidates and the
        GEMM lanes' splits."""
        return tuple(dict.fromkeys([*self.splits, *(g for _, g in self.gemm_lanes if g is not None)]))

    def modes(self, simulated: bool = False) -> list[str]:
        """Every mode of a run; a simulation leaves out what no profile can estimate (chunked
        prefill, kernel placement)."""
        chunked = [] if simulated else [f"chunked-{c}" for c in self.chunks]
        placed = [] if simulated else [gemm_mode_name(h, g) for h, g in self.gemm_lanes]
        return [SEQUENTIAL, *chunked, *(f"static-{s.key}" for s in self.splits), *placed, ORCHESTRATED]

    def split_of(self, mode: str) -> SMSplit:
        """The split of a ``static-*`` mode (the home split of a kernel-placement mode)."""
        placed = self.gemm_lane_of(mode)
        if placed is not None:
            return placed[0]
        return next(s for s in self.splits if f"static-{s.key}" == mode)

    def gemm_lane_of(self, mode: str):
        """``(home split, GEMM lane Placement)`` of a kernel-placement mode; None for any other."""
        from .engine.placement import WHOLE_GPU, Placement

        if GEMM_MODE.fullmatch(mode) is None:
            return None
        for home, gemm in self.gemm_lanes:
            if gemm_mode_name(home, gemm) == mode:
                return home, (WHOLE_GPU if gemm is None else Placement(gemm, DECODE))
        raise ValueError(f"mode {mode!r} is not one of this plan's kernel-placement modes: "
                         f"{', '.join(gemm_mode_name(h, g) for h, g in self.gemm_lanes) or 'none'}")

    @staticmethod
    def plain_static(mode: str) -> str:
        """The plain ``static-<split>`` mode a kernel-placement mode is compared with."""
        m = GEMM_MODE.fullmatch(mode)
        return mode if m is None else f"static-{m['home']}"


def mix_work(name: str) -> MixWork:
    """A named mix (``A``, ``B``) or a sweep point ``p<tokens>-b<batch>-c<context>`` (6 decode steps)."""
    if name in MIXES:
        return MIXES[name]
    m = MIX_NAME.fullmatch(name)
    if m is None:
        raise ValueError(f"unknown mix {name!r}; mixes: {', '.join(MIXES)} or p<tokens>-b<batch>-c<context>")
    return MixWork(int(m[1]), int(m[2]), int(m[3]), decode_steps=6)


def tpot_target_ms(work: MixWork, estimator: Estimator, factor: float) -> float:
    return factor * estimator.decode_ms(work.decode_batch, work.context, estimator.sm_count).ms


def plan_mode(mode: str, work: MixWork, estimator: Estimator, plan: BenchPlan) -> list[Launch]:
    """The launches of a split-based mode (sequential, static-*, orchestrated)."""
    if mode == SEQUENTIAL:
        out, t = [], 0.0
        for g in estimator.groups:
            ms = estimator.prefill_group_ms(work.prompt_tokens, g, estimator.sm_count).ms
            out.append(Launch(PREFILL, g, None, t, t + ms, False, False))
            t += ms
        for k in range(work.decode_steps):
            ms = estimator.decode_ms(work.decode_batch, work.context, estimator.sm_count).ms
            out.append(Launch(DECODE, k, None, t, t + ms, False, k == 0))
            t += ms
        return out
    if mode == ORCHESTRATED:
        policy = SLOPolicy(estimator, plan.splits, tpot_target_ms(work, estimator, plan.tpot_factor))
        return plan_mix(work, estimator, policy, handoff=True)
    return plan_mix(work, estimator, StaticPolicy(estimator, plan.split_of(mode)), handoff=False)


def splits_used(launches: list[Launch]) -> list[str]:
    return list(dict.fromkeys("whole-gpu" if x.split is None else x.split.key for x in launches))


# ---------------------------------------------------------------------------------- simulation


def simulate(plan: BenchPlan, estimator: Estimator) -> list[dict]:
    """Rows of every split-based mode, from the estimator alone (no GPU)."""
    rows = []
    for name in plan.mixes:
        work = mix_work(name)
        bound = sm_time_bound(work, estimator, list(plan.splits))
        for mode in plan.modes(simulated=True):
            launches = plan_mode(mode, work, estimator, plan)
            corun = [x.end_ms - x.start_ms for x in launches if x.phase == DECODE and x.corun]
            rows.append({
                "mix": name, "mode": mode, "simulated": True, **dataclasses.asdict(work),
                "median_ms": makespan(launches), "estimated_ms": makespan(launches),
                "splits_used": splits_used(launches), "bound_ms": bound["ms"],
                "decode_corun_max_ms": max(corun) if corun else None,
            })
    return rows


# ------------------------------------------------------------------------------------ on a GPU


class MixBench:
    """The model, its runner and every mix's steps, on one GPU; ``run(mix)`` times all modes."""

    def __init__(self, plan: BenchPlan, partitioner, estimator: Estimator):
        import torch

        from .config import EngineConfig
        from .orchestrate.orchestrator import Orchestrator
        from .orchestrate.rig import Rig

        self.plan, self.estimator = plan, estimator
        works = [mix_work(m) for m in plan.mixes]
        prefill_buckets = {w.prompt_tokens for w in works}
        for w in works:
            for c in plan.chunks:
                prefill_buckets |= {min(c, w.prompt_tokens) + w.decode_batch, min(c, w.prompt_tokens)}
        cfg = EngineConfig(
            decode_buckets=tuple(sorted({w.decode_batch for w in works})), prefill_buckets=tuple(sorted(prefill_buckets)),
            prefill_max_seqs=max(w.decode_batch for w in works) + 1, layer_groups=len(estimator.groups),
            backend=plan.backend,
            splits=plan.all_splits,  # the GEMM lanes' splits too: every split opens up front
        )
        self.rig = Rig(plan.preset, cfg, max_batch=max(w.decode_batch for w in works),
                       max_context=max(w.context for w in works), max_prompt=max(w.prompt_tokens for w in works),
                       partitioner=partitioner)
        self.orch = Orchestrator()
        self.torch = torch
        self.reference: dict = {}  # mix -> the sequential mode's prompt logits
        self.decode_alone: dict = {}  # mix -> the sequential mode's decode step (whole GPU, alone)
        self.decode_reference: dict = {}  # (mix, static mode) -> its last decode step's logits

    def gemm_refusal(self, mode: str) -> str:
        """Why this run's backend cannot run kernel-placement ``mode`` ("" where it can)."""
        from .engine.kernel_lanes import backend_refusal

        home, gemm_lane = self.plan.gemm_lane_of(mode)
        parts = self.rig.runner.partitioner
        sets = [parts.get(home)] + ([] if gemm_lane.split is None else [parts.get(gemm_lane.split)])
        return backend_refusal(parts.backend.name, any(p.needs_scope for p in sets))

    def _logits(self, phase: str, bucket: int):
        return self.rig.runner.graphs.buffers(phase, bucket).logits

    def _split_mode(self, mode: str, work: MixWork):
        """``(run once -> orchestrator Run, launches)`` for a split-based mode."""
        launches = plan_mode(mode, work, self.estimator, self.plan)
        placed = self.plan.gemm_lane_of(mode)
        if placed is None:
            fns = self.rig.mix_launchers(work, self.orch.streams)
        else:
            from .engine.placement import Placement

            home, gemm_lane = placed
            fns = self.rig.mix_launchers(work, self.orch.streams, gemm_lane, Placement(home, DECODE))
        return (lambda: self.orch.issue(launches, fns).synchronize()), launches

    def _chunked_mode(self, chunk: int, work: MixWork):
        """One stream: ``ceil(prompt / chunk)`` chunks, each fused with a decode step while
        decode steps remain; leftover decode steps run as plain decode graphs."""
        torch, rig = self.torch, self.rig
        from .engine.placement import WHOLE_GPU

        chunk = min(chunk, work.prompt_tokens)
        starts = list(range(0, work.prompt_tokens, chunk))
        stream = self.orch.streams[PREFILL]

        def run():
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(stream)
            with torch.cuda.stream(stream):
                for i in range(max(len(starts), work.decode_steps)):
                    n = min(chunk, work.prompt_tokens - starts[i]) if i < len(starts) else 0
                    b = work.decode_batch if i < work.decode_steps else 0
                    if n and b:
                        step = rig.prepare(rig.mixed_batch(starts[i], n, b, work.context), WHOLE_GPU)
                    elif n:
                        step = rig.prepare(rig.prefill_batch(n, starts[i]), WHOLE_GPU)
                    else:
                        step = rig.prepare(rig.decode_batch(b, work.context), WHOLE_GPU)
                    step.launch(stream)
                    if i == len(starts) - 1:
                        self.last_chunk = step
            end.record(stream)
            end.synchronize()
            return begin.elapsed_time(end)

        return run

    def mode(self, name: str, mode: str) -> "ModeRun":
        """One mode of one mix, ready to run (``once()``) and to report (``row()``)."""
        return ModeRun(self, name, mode)

    def run(self, name: str) -> list[dict]:
        """Every mode of mix ``name``: one warm-up run (it captures the graphs), then ``reps``."""
        from .measure import GpuMonitor

        rows = []
        for mode in self.plan.modes():
            if self.plan.gemm_lane_of(mode) is not None and self.gemm_refusal(mode):
                print(f"bullet bench: {mode} left out: {self.gemm_refusal(mode)}", flush=True)
                continue
            m = self.mode(name, mode)
            m.once()
            m.reset()
            with GpuMonitor() as gpu:
                for _ in range(self.plan.reps):
                    m.once()
            rows.append(m.row(gpu.summary()))
            self.torch.cuda.synchronize()
        return rows

    @staticmethod
    def _lane_fields(runs, launches: list[Launch]) -> dict:
        corun = [t for r in runs for x, t in zip([x for x in launches if x.phase == DECODE], r.lane_ms(DECODE)) if x.corun]
        return {
            "host_ms_per_launch": statistics.median(r.host_ms_per_launch for r in runs),
            "prefill_done_ms": statistics.median(r.finish_ms(PREFILL) for r in runs),
            "decode_done_ms": statistics.median(r.finish_ms(DECODE) for r in runs),
            "decode_step_median_ms": statistics.median(t for r in runs for t in r.lane_ms(DECODE)),
            "decode_corun_max_ms": max(corun) if corun else None,
            "decode_corun_median_ms": statistics.median(corun) if corun else None,
        }

    def close(self) -> None:
        self.rig.close()


class ModeRun:
    """Runs of one mode of one mix; the sequential mode of a mix must run first (its prompt
    logits are the reference every other mode is compared with, its decode step the alone time)."""

    def __init__(self, bench: MixBench, name: str, mode: str):
        self.bench, self.name, self.mode, self.work = bench, name, mode, mix_work(name)
        self.launches: list[Launch] | None = None
        if mode.startswith("chunked-"):
            self._run = bench._chunked_mode(int(mode.removeprefix("chunked-")), self.work)
        else:
            self._run, self.launches = bench._split_mode(mode, self.work)
        self.reset()

    def reset(self) -> None:
        self.times: list[float] = []
        self.runs: list = []

    def once(self) -> float:
        out = self._run()
        if self.launches is None:
            ms = out
        else:
            self.runs.append(out)
            ms = out.wall_ms
        self.times.append(ms)
        return ms

    def prompt_logits(self):
        if self.launches is None:  # row 0 of the last chunk's logits is the prompt's last token
            return self.bench._logits("prefill", self.bench.last_chunk.bucket)[0].clone()
        return self.bench._logits("prefill", self.work.prompt_tokens)[0].clone()

    def decode_fields(self) -> dict:
        """A kernel-placement mode's last decode logits against its plain static mode's (same
        kernels and inputs on other SMs: equal up to bf16 summation order). A plain static mode
        keeps its logits as that reference."""
        b, work = self.bench, self.work
        if self.launches is None or not self.mode.startswith("static-"):
            return {}
        plain = b.plan.plain_static(self.mode)
        if plain == self.mode and self.mode not in {b.plan.plain_static(m) for m in b.plan.modes() if m != self.mode}:
            return {}  # no placement mode compares with this one: keep no copy
        logits = b._logits("decode", work.decode_batch)[: work.decode_batch].clone()
        if plain == self.mode:
            b.decode_reference[(self.name, plain)] = logits
            return {}
        reference = b.decode_reference.get((self.name, plain))
        if reference is None:  # its plain static mode has not run (it runs first in modes())
            return {"decode_reference_mode": None}
        return {
            "decode_reference_mode": plain,
            "decode_logits_max_abs_diff": (logits - reference).abs().max().item(),
            "decode_argmax_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        }

    def row(self, gpu: dict) -> dict:
        b, work = self.bench, self.work
        logits = self.prompt_logits()
        reference = b.reference.setdefault(self.name, logits)
        extra = {}
        if self.launches is not None:
            extra = b._lane_fields(self.runs, self.launches)
            if self.mode == SEQUENTIAL:
                b.decode_alone[self.name] = extra["decode_step_median_ms"]
            extra.update(self.decode_fields())
        bound = sm_time_bound(work, b.estimator, list(b.plan.splits))
        times = self.times
        return {
            "mix": self.name, "mode": self.mode, "simulated": False, **dataclasses.asdict(work),
            "median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "samples_ms": [round(t, 4) for t in times],
            # the estimator knows no kernel placement: its estimate would be the plain static mode's
            "estimated_ms": (makespan(self.launches) if self.launches and b.plan.gemm_lane_of(self.mode) is None
                             else None),
            "splits_used": splits_used(self.launches) if self.launches else ["whole-gpu"],
            "bound_ms": bound["ms"], "prompt_logits_max_abs_diff": (logits - reference).abs().max().item(),
            "prompt_argmax_agrees": bool(logits.argmax() == reference.argmax()),
            "decode_alone_ms": b.decode_alone.get(self.name), **extra, **gpu,
        }


# ------------------------------------------------------------------------------ summary, table


def gemm_placement_summary(mine: dict[str, dict]) -> dict:
    """Each kernel-placement mode of one mix against its plain static mode: ``speedup`` > 1
    means placing the GEMMs on the wider lane won (the whole mix finished sooner)."""
    out = {}
    for mode, r in mine.items():
        m = GEMM_MODE.fullmatch(mode)
        plain = mine.get(f"static-{m['home']}") if m else None
        if plain is None:
            continue
        out[mode] = {
            "against": plain["mode"], "plain_ms": plain["median_ms"], "placed_ms": r["median_ms"],
            "speedup": plain["median_ms"] / r["median_ms"], "wins": r["median_ms"] < plain["median_ms"],
            **{f"{k}_{which}": src.get(k) for k in ("decode_step_median_ms", "prefill_done_ms", "decode_done_ms")
               for which, src in (("plain", plain), ("placed", r))},
            "decode_logits_max_abs_diff": r.get("decode_logits_max_abs_diff"),
        }
    return out


def summarize(rows: list[dict]) -> dict:
    """Per mix: the better baseline, each mode's speedup over it, and the bound reached; each
    kernel-placement mode against its plain static mode (``gemm_placement``)."""
    out = {}
    for name in dict.fromkeys(r["mix"] for r in rows):
        mine = {r["mode"]: r for r in rows if r["mix"] == name}
        baselines = {m: r["median_ms"] for m, r in mine.items() if m == SEQUENTIAL or m.startswith("chunked-")}
        base_mode = min(baselines, key=baselines.get)
        statics = {m: r["median_ms"] for m, r in mine.items() if m.startswith("static-") and not GEMM_MODE.fullmatch(m)}
        s: dict = {"baseline": base_mode, "baseline_ms": baselines[base_mode]}
        if statics:
            best = min(statics, key=statics.get)
            s.update(best_static=best, best_static_speedup=baselines[base_mode] / statics[best])
        if ORCHESTRATED in mine:
            orch = mine[ORCHESTRATED]
            s.update(orchestrated_ms=orch["median_ms"], orchestrated_speedup=baselines[base_mode] / orch["median_ms"],
                     bound_ms=orch["bound_ms"], bound_speedup=baselines[base_mode] / orch["bound_ms"],
                     bound_fraction=(baselines[base_mode] / orch["median_ms"] - 1) / max(baselines[base_mode] / orch["bound_ms"] - 1, 1e-9))
            if orch.get("decode_corun_max_ms") and orch.get("decode_alone_ms"):
                s["decode_corun_over_alone"] = orch["decode_corun_max_ms"] / orch["decode_alone_ms"]
            if orch.get("estimated_ms") and not orch.get("simulated"):
                s["orchestrated_estimate_error"] = orch["estimated_ms"] / orch["median_ms"] - 1
        placed = gemm_placement_summary(mine)
        if placed:
            s["gemm_placement"] = placed
        out[name] = s
    return out


def table(rows: list[dict], summary: dict) -> str:
    lines = []
    for name, s in summary.items():
        w = mix_work(name)
        lines.append(f"mix {name}: {w.prompt_tokens}-token prompt beside {w.decode_steps} decode steps of batch "
                     f"{w.decode_batch} at context {w.context}")
        base = s["baseline_ms"]
        for r in (r for r in rows if r["mix"] == name):
            est = f"  est {r['estimated_ms']:7.1f}" if r.get("estimated_ms") else ""
            dec = f"  decode co-run max {r['decode_corun_max_ms']:6.2f} ms" if r.get("decode_corun_max_ms") else ""
            lines.append(f"  {r['mode']:34s} {r['median_ms']:8.1f} ms  x{base / r['median_ms']:5.2f}{est}{dec}")
        if "orchestrated_speedup" in s:
            lines.append(f"  orchestrated x{s['orchestrated_speedup']:.2f} vs {s['baseline']}; SM-time bound "
                         f"{s['bound_ms']:.1f} ms (x{s['bound_speedup']:.2f}), {100 * s['bound_fraction']:.0f}% of it reached")
        for mode, g in s.get("gemm_placement", {}).items():
            step = (f"; decode step {g['decode_step_median_ms_plain']:.2f} -> {g['decode_step_median_ms_placed']:.2f} ms"
                    if g.get("decode_step_median_ms_placed") else "")
            done = (f", prefill done {g['prefill_done_ms_plain']:.1f} -> {g['prefill_done_ms_placed']:.1f} ms"
                    if g.get("prefill_done_ms_placed") else "")
            diff = g.get("decode_logits_max_abs_diff")
            diff = f", decode logits diff {diff:.3g}" if diff is not None else ""
            lines.append(f"  {mode} vs {g['against']}: x{g['speedup']:.3f} ({'wins' if g['wins'] else 'loses'}"
                         f"{step}{done}{diff})")
    return "\n".join(lines)


def plot(rows: list[dict], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = list(dict.fromkeys(r["mix"] for r in rows))
    fig, axes = plt.subplots(1, len(mixes), figsize=(6 * len(mixes), 4.5), squeeze=False)
    for ax, name in zip(axes[0], mixes):
        mine = [r for r in rows if r["mix"] == name]
        ax.barh([r["mode"] for r in mine], [r["median_ms"] for r in mine],
                color=["tab:orange" if r["mode"] == ORCHESTRATED else "tab:green" if GEMM_MODE.fullmatch(r["mode"])
                       else "tab:blue" for r in mine])
        ax.axvline(mine[0]["bound_ms"], color="k", ls="--", lw=1, label="SM-time bound")
        ax.set(xlabel="ms (lower is better)", title=f"mix {name}")
        ax.invert_yaxis()
        ax.legend(loc="lower right")
    return results.save_figure(fig, path, title)


def run_extra(plan: BenchPlan, estimator: Estimator, simulated: bool) -> dict:
    return {"model": plan.preset, "weights": "random bf16", "backend": plan.backend, "simulated": simulated,
            "mixes": {m: dataclasses.asdict(mix_work(m)) for m in plan.mixes}, "splits": [s.key for s in plan.splits],
            "gemm_lane_modes": [gemm_mode_name(h, g) for h, g in plan.gemm_lanes],
            "tpot_factor": plan.tpot_factor, "profile": str(estimator.profile.path or ""),
            "profile_commit": estimator.profile.doc.get("commit")}


def main(plan: BenchPlan, out_dir: str, estimator: Estimator, simulated: bool, partitioner=None) -> int:
    t0 = time.perf_counter()
    if simulated:
        rows = simulate(plan, estimator)
    else:
        bench = MixBench(plan, partitioner, estimator)
        try:
            rows = []
            for name in plan.mixes:
                rows += bench.run(name)
                print(table([r for r in rows if r["mix"] == name], summarize([r for r in rows if r["mix"] == name])), flush=True)
        finally:
            bench.close()
    summary = {**summarize(rows), "wall_s": time.perf_counter() - t0}
    name = "colocation-simulated" if simulated else "colocation"
    path = results.write(name, rows, summary, out_dir, **run_extra(plan, estimator, simulated))
    what = "SIMULATION through the latency estimator" if simulated else "measured"
    png = plot(rows, path, f"{plan.preset}: prefill beside decode ({what})")
    if simulated:
        print(table(rows, {k: v for k, v in summary.items() if k != "wall_s"}))
    print(f"results: {path}\nplot: {png}")
    print(json.dumps({k: v for k, v in summary.items()}, indent=1, default=str))
    return 0
