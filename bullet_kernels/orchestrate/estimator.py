"""Latency estimator: a graph's time alone and co-running, interpolated from a measured profile.

The model (documented here because the policy and the simulated ``bullet bench`` rely on it):

- **Alone, one lane of ``n`` SMs.** For each SM count the profile measured, the time is
  piecewise linear in the workload axes: decode steps in batch, then in context (interpolate
  over batch at each measured context, then over context); prefill layer groups in tokens, per
  group (group 0 also embeds, the last also runs the lm_head). Beyond the measured range the
  nearest two points extrapolate linearly, never below the nearest point's fraction of zero.
- **Between SM counts** the time is piecewise linear in ``1/n``: a kernel that splits its work
  over the SMs takes ``a + b/n``, which is exact for compute-bound work and for bandwidth-bound
  work below the memory roofline. Below the smallest SM count measured it extrapolates the same
  way; above the largest it is flat (more SMs never helps less than measured).
- **Co-running.** A lane beside another is slower (shared HBM, L2 and the power cap). The
  profile's co-run grid gives, per split, each lane's slowdown over its alone time; the
  estimate multiplies the alone time by the mean slowdown of that lane at the nearest measured
  decode-lane size (interpolated linearly between sizes). Without co-run points the slowdown is
  1 and :attr:`Estimate.corun_measured` says so.

Every estimate names whether it extrapolated, so a caller can tell a guess from a measurement.
:func:`held_out_errors` measures the model's error on the profile's own points, leaving each
out in turn.
"""

from __future__ import annotations

import bisect
import dataclasses
import statistics
from typing import Callable, Iterable, Sequence

from ..errors import BulletError
from .profile import Profile

# A time is never estimated below this fraction of the nearest measured point when
# extrapolating downwards (a line through two points can cross zero).
FLOOR_FRACTION = 0.25


class EstimateError(BulletError, ValueError):
    """The profile holds no points that can answer the question asked."""


@dataclasses.dataclass(frozen=True)
class Estimate:
    ms: float
    extrapolated: bool = False  # outside the measured points on some axis
    corun_measured: bool = True  # False where a co-run slowdown was asked for but none measured


def interp(xs: Sequence[float], ys: Sequence[float], x: float) -> tuple[float, bool]:
    """Piecewise-linear ``y(x)`` through sorted ``xs``; linear extrapolation from the two nearest
    points. Returns ``(y, extrapolated)``."""
    if not xs:
        raise EstimateError("no points to interpolate")
    if len(xs) == 1:
        return ys[0], x != xs[0]
    if xs[0] <= x <= xs[-1]:
        i = min(max(bisect.bisect_right(xs, x), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0), False
    i = 1 if x < xs[0] else len(xs) - 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    nearest = y0 if x < xs[0] else y1
    return max(y, FLOOR_FRACTION * nearest), True


def _by(points: Iterable[dict], field: str) -> dict:
    out: dict = {}
    for p in points:
        out.setdefault(p[field], []).append(p)
    return out


def _curve(points: Sequence[dict], axis: str) -> tuple[list[float], list[float]]:
    """``(xs, ms)`` sorted by ``axis``; repeated x values are averaged."""
    grouped = _by(points, axis)
    xs = sorted(grouped)
    return xs, [statistics.fmean(p["ms"] for p in grouped[x]) for x in xs]


class Estimator:
    """Predicts decode-step and prefill-group times for any SM count from one profile."""

    def __init__(self, profile: Profile):
        self.profile = profile
        self.sm_count = int(profile.device.get("sm_count") or 0)
        self._lane_sms = {(c["split"], c["lane"]): c["granted"] for c in profile.sm_configs}
        self._decode = _by((self._with_sms(p) for p in profile.decode), "sms")
        self._prefill = _by((self._with_sms(p) for p in profile.prefill), "sms")
        self.groups = sorted({p["group"] for p in profile.prefill})
        self._slowdown = self._slowdowns(profile.corun)
        if not self._decode and not self._prefill:
            raise EstimateError(f"{profile!r} holds no decode or prefill points to estimate from")

    def _with_sms(self, point: dict) -> dict:
        if "sms" in point:
            return point
        sms = self._lane_sms.get((point["split"], point["lane"]))
        if sms is None:
            raise EstimateError(f"point {point!r} names lane {point['split']}/{point['lane']}, which has "
                                "no SM count in the profile's sm_configs")
        return {**point, "sms": sms}

    # -- alone ------------------------------------------------------------------------------

    def _across_sms(self, table: dict, sms: int, at: Callable[[list[dict]], tuple[float, bool]], what: str) -> Estimate:
        if not table:
            raise EstimateError(f"the profile has no {what} points")
        if sms < 1:
            raise ValueError(f"SM count must be >= 1, got {sms}")
        counts = sorted(table)
        values, extrapolated = [], False
        for n in counts:
            y, ex = at(table[n])
            values.append(y)
            extrapolated |= ex
        if sms >= counts[-1]:  # more SMs than measured: flat, never faster than measured
            return Estimate(values[-1], extrapolated or sms > counts[-1])
        # Interpolate in 1/n; xs must ascend, so walk the counts from the largest down.
        y, ex = interp([1 / n for n in reversed(counts)], list(reversed(values)), 1 / sms)
        return Estimate(y, extrapolated or ex)

    def decode_ms(self, batch: int, context: int, sms: int) -> Estimate:
        """One decode step (all layers) of ``batch`` sequences with ``context`` cached tokens each."""
        def at(points: list[dict]) -> tuple[float, bool]:
            by_ctx = _by(points, "context")
            ctxs = sorted(by_ctx)
            ys, ex = [], False
            for c in ctxs:
                y, e = interp(*_curve(by_ctx[c], "batch"), batch)
                ys.append(y)
                ex |= e
            y, e = interp(ctxs, ys, context)
            return y, ex or e

        return self._across_sms(self._decode, sms, at, "decode")

    def prefill_group_ms(self, tokens: int, group: int, sms: int) -> Estimate:
        """One prefill layer group's graph over ``tokens`` prompt tokens."""
        if group not in self.groups:
            raise EstimateError(f"the profile measured prefill groups {self.groups}, not group {group}")

        def at(points: list[dict]) -> tuple[float, bool]:
            mine = [p for p in points if p["group"] == group]
            if not mine:
                raise EstimateError(f"no prefill points of group {group} on {points[0]['sms']} SMs")
            return interp(*_curve(mine, "tokens"), tokens)

        return self._across_sms(self._prefill, sms, at, "prefill")

    def prefill_ms(self, tokens: int, sms: int) -> Estimate:
        """A whole prefill: the sum of its layer groups."""
        parts = [self.prefill_group_ms(tokens, g, sms) for g in self.groups]
        return Estimate(sum(p.ms for p in parts), any(p.extrapolated for p in parts))

    # -- co-running -------------------------------------------------------------------------

    def _slowdowns(self, corun: Sequence[dict]) -> dict[str, tuple[list[float], list[float]]]:
        """Per lane: decode-lane SM counts and the mean slowdown measured there."""
        per: dict[str, dict[int, list[float]]] = {"prefill": {}, "decode": {}}
        for p in corun:
            dsms = self._lane_sms.get((p["split"], "decode"))
            if dsms is None:
                continue
            for lane in per:
                per[lane].setdefault(dsms, []).append(p[lane]["slowdown"])
        return {lane: (sorted(d), [statistics.fmean(d[k]) for k in sorted(d)]) for lane, d in per.items() if d}

    def slowdown(self, lane: str, decode_sms: int) -> tuple[float, bool]:
        """Co-run slowdown of ``lane`` ("prefill" or "decode") when the decode lane has
        ``decode_sms`` SMs; ``(1.0, False)`` where the profile measured none."""
        if lane not in ("prefill", "decode"):
            raise ValueError(f"lane must be 'prefill' or 'decode', got {lane!r}")
        if lane not in self._slowdown:
            return 1.0, False
        xs, ys = self._slowdown[lane]
        # Flat outside the measured sizes: a slowdown is not extrapolated.
        y = ys[0] if decode_sms <= xs[0] else ys[-1] if decode_sms >= xs[-1] else interp(xs, ys, decode_sms)[0]
        return max(1.0, y), True

    def corun(self, alone: Estimate, lane: str, decode_sms: int) -> Estimate:
        factor, measured = self.slowdown(lane, decode_sms)
        return Estimate(alone.ms * factor, alone.extrapolated, measured)


# ------------------------------------------------------------------------------ held-out error


def _without(profile: Profile, grid: str, index: int) -> Profile:
    doc = dict(profile.doc)
    doc[grid] = [p for i, p in enumerate(profile.doc[grid]) if i != index]
    return Profile(doc)


def held_out_errors(profile: Profile) -> dict:
    """Leave-one-out relative errors ``|estimate - measured| / measured`` of every alone point
    (``decode``, ``prefill``) and of every co-run lane time (``corun``: alone estimate with the
    point held out of both grids, times the slowdown estimated without that co-run point).

    Points at the edge of a grid are extrapolations when held out; they are kept (the estimator
    must extrapolate in use too) and counted in ``extrapolated``. Returns per grid ``{"n",
    "median", "p90", "max", "extrapolated"}`` and ``errors`` (every point's error)."""
    out: dict = {}
    for grid in ("decode", "prefill"):
        errs, extra = [], 0
        for i, p in enumerate(profile.doc[grid]):
            try:
                est = Estimator(_without(profile, grid, i))
                e = (est.decode_ms(p["batch"], p["context"], est._with_sms(p)["sms"]) if grid == "decode"
                     else est.prefill_group_ms(p["tokens"], p["group"], est._with_sms(p)["sms"]))
            except EstimateError:
                continue  # the only point of its kind: nothing left to predict it from
            errs.append(abs(e.ms - p["ms"]) / p["ms"])
            extra += e.extrapolated
        out[grid] = _summary(errs, extra)
    errs, extra = [], 0
    base = Estimator(profile)
    for i, p in enumerate(profile.corun):
        held = _without(profile, "corun", i)
        try:
            est = Estimator(held)
        except EstimateError:
            continue
        dsms = base._lane_sms.get((p["split"], "decode"))
        if dsms is None or not est._slowdown:
            continue
        for lane in ("prefill", "decode"):
            factor, measured = est.slowdown(lane, dsms)
            if not measured:
                continue
            predicted = p[lane]["alone_ms"] * factor
            errs.append(abs(predicted - p[lane]["corun_ms"]) / p[lane]["corun_ms"])
            extra += dsms < est._slowdown[lane][0][0] or dsms > est._slowdown[lane][0][-1]
    out["corun"] = _summary(errs, extra)
    return out


def _summary(errs: list[float], extrapolated: int) -> dict:
    if not errs:
        return {"n": 0}
    xs = sorted(errs)
    return {"n": len(xs), "median": statistics.median(xs), "p90": xs[min(len(xs) - 1, int(0.9 * len(xs)))],
            "max": xs[-1], "extrapolated": extrapolated, "errors": [round(x, 5) for x in errs]}
