"""Measured decode steps correcting the profile's: the estimator for a host whose steps are not ours.

A latency profile is measured with our own kernels and graphs. A server that runs another
engine's steps on our lanes (SGLang through ``bullet_sglang``: FlashInfer attention, its own
GEMMs, and the scheduler's CPU work between steps, which the profile never saw) takes longer per
token than the profile says. Measured on the H200 at b27f44a: SGLang's decode steps on the whole
GPU at batch 10-20 and about 1k context took 9.8 ms in the adapter's loop (8.8 ms in SGLang's own
loop without its overlap scheduler), where the shipped profile says 5.3 ms at batch 16, so a
policy trusting the profile put decode on 32-80 SMs (48 most often) under a 10 ms target and P90
TPOT came out at 14.6-16.7 ms (docs/sglang-adapter.md).

:class:`StepFeedback` keeps, per decode-lane SM count, the measured minus estimated time of the
last :data:`WINDOW` steps no older than :data:`MAX_AGE_S`, and answers their median (robust to
the odd long step: a prefill enqueued in the same turn). A lane without enough fresh samples gets
the median over every lane's, then 0. :class:`FeedbackEstimator` is an
:class:`~.estimator.Estimator` whose decode steps are corrected by it, so every policy plans with
measured times without knowing about the correction.

Decisions, from the b27f44a run: the correction is an added time, not a ratio, because what the
profile misses is mostly per-step time that does not scale with the step (the host's CPU work
between steps, 4.5 ms at batch 16 on the whole GPU); a ratio learned from fast whole-GPU steps
(1.85x there) would turn the profile's 9.0 ms co-running step on 32 SMs into 16.7 ms where about
13.5 is expected. Samples expire because a policy never chooses a lane it over-estimates, so
that lane would never be measured again: once its samples are older than :data:`MAX_AGE_S` it
falls back to the pooled correction and may be chosen, and measured, again.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
import time
from typing import Callable

from .estimator import Estimate, Estimator
from .profile import Profile

WINDOW = 64  # samples kept per lane: a few seconds of decode steps
MIN_SAMPLES = 8  # fewer fresh ones than this and a lane borrows the pooled median
MAX_AGE_S = 30.0  # older samples are forgotten (see the module's notes)
MAX_EXTRA = 4.0  # one sample adds at most this many estimates: a stall must not swing the policy
FLOOR = 0.25  # a corrected step is never below this fraction of the profile's


class StepFeedback:
    """Median measured-minus-estimated decode-step times, per decode-lane SM count."""

    def __init__(self, window: int = WINDOW, min_samples: int = MIN_SAMPLES, max_age_s: float = MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic):
        if window < 1 or not 1 <= min_samples <= window or not max_age_s > 0:
            raise ValueError(f"need window >= 1, 1 <= min_samples <= window and max_age_s > 0, got {window}, "
                             f"{min_samples}, {max_age_s}")
        self.window, self.min_samples, self.max_age_s, self.clock = window, min_samples, max_age_s, clock
        self._by_sms: dict[int, collections.deque] = {}
        self.observed = 0

    def observe(self, sms: int, estimated_ms: float, measured_ms: float) -> None:
        """One decode step on a ``sms``-SM lane: the profile said ``estimated_ms``, it took
        ``measured_ms`` (launch to the next launch: the time a token took)."""
        if isinstance(sms, bool) or not isinstance(sms, int) or sms < 1:
            raise ValueError(f"a decode lane has a positive whole number of SMs, got {sms!r}")
        for name, v in (("estimated_ms", estimated_ms), ("measured_ms", measured_ms)):
            if not (isinstance(v, (int, float)) and 0 < v < math.inf):
                raise ValueError(f"{name} must be a positive finite time, got {v!r}")
        extra = min(measured_ms - estimated_ms, MAX_EXTRA * estimated_ms)
        self._by_sms.setdefault(sms, collections.deque(maxlen=self.window)).append((self.clock(), extra))
        self.observed += 1

    def _fresh(self, sms: int | None = None) -> list[float]:
        since = self.clock() - self.max_age_s
        lanes = self._by_sms.values() if sms is None else [self._by_sms.get(sms, ())]
        return [extra for lane in lanes for t, extra in lane if t >= since]

    def offset_ms(self, sms: int) -> float:
        """What to add to the profile's decode step on ``sms`` SMs."""
        for samples in (self._fresh(sms), self._fresh()):
            if len(samples) >= self.min_samples:
                return statistics.median(samples)
        return 0.0

    def corrected_ms(self, sms: int, estimated_ms: float) -> float:
        return max(estimated_ms + self.offset_ms(sms), FLOOR * estimated_ms)

    def summary(self) -> dict[int, dict]:
        """Per lane measured: fresh samples and the correction in use (ms)."""
        return {sms: {"samples": len(self._fresh(sms)), "offset_ms": round(self.offset_ms(sms), 3)}
                for sms in sorted(self._by_sms)}


class FeedbackEstimator(Estimator):
    """An :class:`Estimator` whose decode steps are the profile's corrected by measured ones."""

    def __init__(self, profile: Profile, feedback: StepFeedback | None = None):
        super().__init__(profile)
        self.feedback = feedback if feedback is not None else StepFeedback()

    def profiled_decode_ms(self, batch: int, context: int, sms: int) -> Estimate:
        """The profile's estimate, uncorrected: what measured steps are compared with."""
        return super().decode_ms(batch, context, sms)

    def decode_ms(self, batch: int, context: int, sms: int) -> Estimate:
        est = super().decode_ms(batch, context, sms)
        return dataclasses.replace(est, ms=self.feedback.corrected_ms(sms, est.ms))


class StepClock:
    """Feeds :class:`StepFeedback` from decode launches: one launch to the next on the same lane
    is the time one token took there (the host's CPU work between steps included, which is what
    TPOT sees). :meth:`interrupt` drops the step in progress: a group switch waits for both
    lanes, and that wait belongs to no lane."""

    def __init__(self, feedback: StepFeedback):
        self.feedback = feedback
        self._last: tuple[float, int, float] | None = None

    def launched(self, now_s: float, sms: int, estimated_ms: float) -> None:
        """A decode step launched at ``now_s`` (seconds, monotonic) on ``sms`` SMs, for which the
        profile estimates ``estimated_ms``. Never raises on what it is given (it runs in a
        server's step path): an estimate that is not a positive finite time is not compared."""
        if self._last is not None:
            then, last_sms, last_est = self._last
            if last_sms == sms and now_s > then:
                self.feedback.observe(last_sms, last_est, (now_s - then) * 1e3)
        ok = isinstance(sms, int) and sms > 0 and isinstance(estimated_ms, (int, float)) and 0 < estimated_ms < math.inf
        self._last = (now_s, sms, estimated_ms) if ok else None

    def interrupt(self) -> None:
        self._last = None
