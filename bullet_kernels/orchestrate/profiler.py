"""The profiler (``bullet profile``): measures the grid the estimator interpolates.

Three grids (graphs/README.md gives the schema): decode steps by batch x context on the whole
GPU and on each candidate split's decode lane; prefill layer groups by prompt tokens on the
whole GPU and on each prefill lane; and co-run points, where one split's two lanes replay a
prefill layer group and a decode step at the same time. Every point is a median of CUDA-event
timed graph replays (graphs captured on the lane first, as the engine replays them), with the
SM clock and power sampled while it ran. The file is saved after every few points and a run
resumes where the last one stopped (points already present are skipped).

Co-run timing: both lanes loop their graph on their own streams for several times the slower
one's alone time; only launches that start and end inside the window where both loops run
count, so neither lane's number includes time alone.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Sequence

from ..partition import SMSplit
from .profile import WHOLE_GPU, Profile, model_config_dict, profile_path

SAVE_EVERY = 8  # points between saves
CORUN_SPAN = 6  # co-run window, in units of the slower lane's alone time
DEFAULT_SPLITS = ("prefill=100,decode=32", "prefill=84,decode=48", "prefill=68,decode=64", "prefill=52,decode=80")


@dataclasses.dataclass(frozen=True)
class ProfileGrid:
    tokens: tuple[int, ...] = (512, 1024, 2048, 4096)
    batches: tuple[int, ...] = (8, 32, 64, 128)
    contexts: tuple[int, ...] = (512, 1024, 2048, 4096)
    splits: tuple[SMSplit, ...] = tuple(SMSplit.parse(s) for s in DEFAULT_SPLITS)
    # Eight layer groups: the split can change every 4 layers of a 32-layer model, so a lane
    # whose partner finishes waits at most an eighth of a prefill for the whole GPU.
    groups: int = 8
    reps: int = 5
    corun_prefill: tuple[int, ...] = (2048, 4096)
    corun_decode: tuple[tuple[int, int], ...] = ((32, 1024), (128, 2048))

    def __post_init__(self):
        from .policy import check_splits

        object.__setattr__(self, "splits", tuple(check_splits(self.splits)))
        for name in ("tokens", "batches", "contexts", "corun_prefill"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"profile grid {name} must be positive ints, got {values!r}")
        if not set(self.corun_prefill) <= set(self.tokens):
            raise ValueError(f"co-run prefill sizes {self.corun_prefill} must be among the grid's tokens {self.tokens}")
        for b, c in self.corun_decode:
            if b not in self.batches or c not in self.contexts:
                raise ValueError(f"co-run decode point ({b}, {c}) must be on the grid's batches and contexts")

    def as_dict(self) -> dict:
        lanes = [WHOLE_GPU] + [s.key for s in self.splits]
        return {
            "prefill": {"tokens": list(self.tokens), "groups": self.groups, "splits": lanes},
            "decode": {"batch": list(self.batches), "context": list(self.contexts), "splits": lanes},
            "corun": {"splits": [s.key for s in self.splits], "prefill_tokens": list(self.corun_prefill),
                      "decode": [list(p) for p in self.corun_decode]},
        }


QUICK_GRID = dict(tokens=(1024, 4096), batches=(32, 128), contexts=(1024, 2048), corun_prefill=(4096,),
                  corun_decode=((128, 2048),), reps=3)


def new_profile(preset: str, grid: ProfileGrid, backend: str, command: str) -> Profile:
    import torch
    import triton

    from .. import __version__
    from ..device import describe_state
    from ..measure import gpu_limits
    from ..models.presets import preset_config
    from ..results import commit, gpu_slug

    info, reason = describe_state()
    if info is None:
        raise RuntimeError(f"profiling needs a GPU ({reason})")
    limits = gpu_limits(info.index)
    return Profile.new(
        gpu=gpu_slug(info.name), model=preset, model_config=model_config_dict(preset_config(preset)),
        device=info.as_dict(), driver={"kernel": info.kernel_driver, "cuda_api": info.driver_api_version_str},
        software={"bullet_kernels": __version__, "torch": torch.__version__, "triton": triton.__version__},
        commit=commit(), command=command,
        engine={"backend": backend, "page_size": 16, "layer_groups": grid.groups,
                "decode_buckets": list(grid.batches), "prefill_buckets": list(grid.tokens)},
        timing={"method": "cuda-events", "warmup": 1, "reps": grid.reps, "statistic": "median"},
        power={"power_limit_w": limits.get("power_limit_w"), "max_sm_clock_mhz": limits.get("sm_clock_max_mhz")},
        grid=grid.as_dict(),
    )


def _clock_fields(gpu: dict) -> dict:
    return {k: gpu[k] for k in ("sm_clock_mhz", "power_w") if isinstance(gpu.get(k), (int, float))}


class Profiler:
    def __init__(self, preset: str, grid: ProfileGrid, path: Path, backend: str = "green", resume: bool = True,
                 command: str = "bullet profile"):
        self.preset, self.grid, self.path, self.backend = preset, grid, Path(path), backend
        if resume and self.path.exists():
            self.profile = Profile.load(self.path)
            info = new_profile(preset, grid, backend, command)
            self.profile.check_matches(device_name=info.device["name"], sm_count=info.device["sm_count"],
                                       model_config=info.model_config)
        else:
            self.profile = new_profile(preset, grid, backend, command)
        self._unsaved = 0

    # -- lanes -------------------------------------------------------------------------------

    def lanes(self, lane: str) -> list:
        """``(split key, lane name, Placement)`` of the whole GPU and each split's ``lane``."""
        from ..engine.placement import WHOLE_GPU as WHOLE, Placement

        return [(WHOLE_GPU, "main", WHOLE)] + [(s.key, lane, Placement(s, lane)) for s in self.grid.splits]

    def _add(self, grid: str, point: dict) -> None:
        self.profile.add_point(grid, point)
        self._unsaved += 1
        if self._unsaved >= SAVE_EVERY:
            self.save()

    def save(self) -> Path:
        self._unsaved = 0
        return self.profile.save(self.path)

    # -- measuring ---------------------------------------------------------------------------

    def run(self, progress: bool = True) -> Profile:
        import torch
        from tqdm import tqdm

        from ..config import EngineConfig
        from ..partition import Partitioner
        from .rig import Rig

        g = self.grid
        with Partitioner(self.backend) as parts:
            for split in g.splits:  # open and verify every split before other GPU work
                pset = parts.get(split)
                for lane in split.names:
                    self.profile.add_sm_config(split.key, lane, split[lane], pset.lane(lane).granted)
            n = torch.cuda.get_device_properties(0).multi_processor_count
            self.profile.add_sm_config(WHOLE_GPU, "main", n, n)
            cfg = EngineConfig(decode_buckets=g.batches, prefill_buckets=g.tokens, prefill_max_seqs=1,
                               layer_groups=g.groups, backend=self.backend, splits=g.splits)
            rig = Rig(self.preset, cfg, max_batch=max(g.batches), max_context=max(g.contexts),
                      max_prompt=max(g.tokens), partitioner=parts)
            self.stream = torch.cuda.Stream()
            self.sms = {(c["split"], c["lane"]): c["granted"] for c in self.profile.sm_configs}
            todo = ([("decode", lane, b, c) for lane in self.lanes("decode") for b in g.batches for c in g.contexts]
                    + [("prefill", lane, t, None) for lane in self.lanes("prefill") for t in g.tokens]
                    + [("corun", s, t, d) for s in g.splits for t in g.corun_prefill for d in g.corun_decode])
            bar = tqdm(todo, desc="profiling", unit="point", disable=not progress, file=sys.stderr)
            try:
                for kind, where, a, b in bar:
                    if kind == "decode":
                        self._decode(rig, where, a, b)
                    elif kind == "prefill":
                        self._prefill(rig, where, a)
                    else:
                        self._corun(rig, where, a, b)
            finally:
                self.save()
                rig.close()
        self.profile.complete = True
        self.save()
        return self.profile

    def _time(self, fn, stream, rounds: int) -> tuple[dict, dict]:
        from ..measure import EventTimer, GpuMonitor

        timer = EventTimer(fn, stream)
        timer.warmup()  # the first replay captures the graph (lazy capture)
        with GpuMonitor() as gpu:
            stats = timer.run(rounds)
        return stats, gpu.summary()

    def _point(self, stats: dict, gpu: dict) -> dict:
        return {"ms": stats["median_ms"], "ms_p10": stats["p10_ms"], "ms_p90": stats["p90_ms"], "n": stats["reps"],
                **_clock_fields(gpu)}

    def _decode(self, rig, where, batch: int, context: int) -> None:
        split, lane, placement = where
        key = {"batch": batch, "context": context, "split": split, "lane": lane}
        if self.profile.has_point("decode", key):
            return
        import torch

        with torch.cuda.stream(self.stream):
            step = rig.prepare(rig.decode_batch(batch, context), placement)
        stats, gpu = self._time(lambda: step.launch(self.stream), self.stream, 4 * self.grid.reps)
        self._add("decode", {**key, "sms": self.sms[(split, lane)], **self._point(stats, gpu)})

    def _prefill(self, rig, where, tokens: int) -> None:
        split, lane, placement = where
        keys = [{"tokens": tokens, "group": gi, "split": split, "lane": lane} for gi in range(self.grid.groups)]
        if all(self.profile.has_point("prefill", k) for k in keys):
            return
        import torch

        with torch.cuda.stream(self.stream):
            step = rig.prepare(rig.prefill_batch(tokens), placement)
        layers = rig.runner.groups
        for gi, key in enumerate(keys):
            stats, gpu = self._time(lambda: step.launch_group(gi, None, self.stream), self.stream, self.grid.reps)
            self._add("prefill", {**key, "layers": list(layers[gi]), "sms": self.sms[(split, lane)], **self._point(stats, gpu)})

    def _corun_group(self) -> int:
        return 1 if self.grid.groups > 2 else 0  # a middle group: layers only, as most groups are

    def _corun(self, rig, split: SMSplit, tokens: int, decode: Sequence[int]) -> None:
        import torch

        from ..engine.placement import Placement
        from ..measure import GpuMonitor

        batch, context = decode
        group = self._corun_group()
        point = {"split": split.key, "prefill": {"tokens": tokens, "group": group},
                 "decode": {"batch": batch, "context": context}}
        if self.profile.has_point("corun", point):
            return
        alone_p = self.profile.points("prefill", tokens=tokens, group=group, split=split.key, lane="prefill")
        alone_d = self.profile.points("decode", batch=batch, context=context, split=split.key, lane="decode")
        if not alone_p or not alone_d:
            raise RuntimeError(f"co-run point {point} needs its alone points measured first")
        ap, ad = alone_p[0]["ms"], alone_d[0]["ms"]
        streams = {"prefill": torch.cuda.Stream(), "decode": torch.cuda.Stream()}
        with torch.cuda.stream(streams["prefill"]):
            pstep = rig.prepare(rig.prefill_batch(tokens), Placement(split, "prefill"))
        with torch.cuda.stream(streams["decode"]):
            dstep = rig.prepare(rig.decode_batch(batch, context), Placement(split, "decode"))
        span = CORUN_SPAN * max(ap, ad)
        loops = {"prefill": (int(span / ap) + 2, lambda s: pstep.launch_group(group, None, s)),
                 "decode": (int(span / ad) + 2, lambda s: dstep.launch(s))}
        torch.cuda.synchronize()
        go = torch.cuda.Event()
        go.record()
        events = {}
        with GpuMonitor() as gpu:
            for lane, (count, fn) in loops.items():
                s = streams[lane]
                s.wait_event(go)
                evs = []
                for _ in range(count):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record(s)
                    fn(s)
                    b.record(s)
                    evs.append((a, b))
                events[lane] = evs
            torch.cuda.synchronize()
        first = events["prefill"][0][0]
        spans = {lane: [(first.elapsed_time(a), first.elapsed_time(b)) for a, b in evs] for lane, evs in events.items()}
        lo = max(spans["prefill"][0][0], spans["decode"][0][0])
        hi = min(spans["prefill"][-1][1], spans["decode"][-1][1])
        out = dict(point)
        for lane, alone in (("prefill", ap), ("decode", ad)):
            inside = [b - a for a, b in spans[lane] if a >= lo and b <= hi]
            if not inside:
                raise RuntimeError(f"co-run of {point}: no {lane} launch fell inside the overlap window")
            ms = statistics.median(inside)
            out[lane] = {**out[lane], "alone_ms": alone, "corun_ms": ms, "slowdown": ms / alone, "n": len(inside)}
        out.update({"n": min(out["prefill"]["n"], out["decode"]["n"]), **_clock_fields(gpu.summary())})
        self._add("corun", out)


def default_path(preset: str) -> Path:
    from ..device import describe_state
    from ..results import gpu_slug

    info, _ = describe_state()
    return profile_path(gpu_slug(info.name) if info else "cpu", preset)
