"""Measured decode steps correcting the profile's: the estimator for a host whose steps are not ours.

A latency profile is measured with our own kernels and graphs. A server that runs another
engine's steps on our lanes (SGLang through ``bullet_sglang``: FlashInfer attention, its own
GEMMs, and the scheduler's CPU work between steps, which the profile never saw) takes longer per
token than the profile says. Measured on the H200 at b27f44a: SGLang's decode steps on the whole
GPU at batch 10-20 and about 1k context took 9.8 ms in the adapter's loop (8.8 ms in SGLang's own
loop without its overlap scheduler), where the shipped profile says 5.3 ms at batch 16, so a
policy trusting the profile put decode on 32-48 SMs under a 10 ms target and P90 TPOT came out
at 15-16 ms (docs/sglang-adapter.md).

:class:`StepFeedback` keeps, per decode-lane SM count, the last :data:`WINDOW` ratios of a
measured step to the profile's estimate for it, and answers their median (robust to the odd
long step: a group switch, a prefill enqueued in the same turn). A lane not yet measured gets
the median over every lane measured, then 1.0. :class:`FeedbackEstimator` is an
:class:`~.estimator.Estimator` whose decode steps are scaled by it, so every policy plans with
measured times without knowing about the correction. A multiplicative ratio is the simplest
model that keeps the profile's shape (batch, context, SMs); a host whose extra cost is a fixed
CPU time per step is over-corrected at large batches and under-corrected at small ones, which
the per-lane windows partly absorb.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics

from .estimator import Estimate, Estimator
from .profile import Profile

WINDOW = 64  # ratios kept per lane: a few seconds of decode steps
MIN_SAMPLES = 8  # fewer than this and a lane borrows the pooled median
RATIO_RANGE = (0.25, 8.0)  # a single ratio outside this is clamped: a stall must not swing the policy


class StepFeedback:
    """Medians of measured/estimated decode-step ratios, per decode-lane SM count."""

    def __init__(self, window: int = WINDOW, min_samples: int = MIN_SAMPLES):
        if window < 1 or not 1 <= min_samples <= window:
            raise ValueError(f"need window >= 1 and 1 <= min_samples <= window, got {window}, {min_samples}")
        self.window, self.min_samples = window, min_samples
        self._by_sms: dict[int, collections.deque] = {}
        self._pooled: collections.deque = collections.deque(maxlen=window)
        self.observed = 0

    def observe(self, sms: int, estimated_ms: float, measured_ms: float) -> None:
        """One decode step on a ``sms``-SM lane: the profile said ``estimated_ms``, it took
        ``measured_ms`` (launch to the next launch: the time a token took)."""
        if isinstance(sms, bool) or not isinstance(sms, int) or sms < 1:
            raise ValueError(f"a decode lane has a positive whole number of SMs, got {sms!r}")
        for name, v in (("estimated_ms", estimated_ms), ("measured_ms", measured_ms)):
            if not (isinstance(v, (int, float)) and 0 < v < math.inf):
                raise ValueError(f"{name} must be a positive finite time, got {v!r}")
        ratio = min(max(measured_ms / estimated_ms, RATIO_RANGE[0]), RATIO_RANGE[1])
        self._by_sms.setdefault(sms, collections.deque(maxlen=self.window)).append(ratio)
        self._pooled.append(ratio)
        self.observed += 1

    def factor(self, sms: int) -> float:
        """What to multiply the profile's decode step on ``sms`` SMs by."""
        own = self._by_sms.get(sms, ())
        if len(own) >= self.min_samples:
            return statistics.median(own)
        if len(self._pooled) >= self.min_samples:
            return statistics.median(self._pooled)
        return 1.0

    def summary(self) -> dict[int, dict]:
        """Per lane measured: samples in the window and the factor in use."""
        return {sms: {"samples": len(r), "factor": round(self.factor(sms), 3)} for sms, r in sorted(self._by_sms.items())}


class FeedbackEstimator(Estimator):
    """An :class:`Estimator` whose decode steps are the profile's times the lane's measured ratio."""

    def __init__(self, profile: Profile, feedback: StepFeedback | None = None):
        super().__init__(profile)
        self.feedback = feedback if feedback is not None else StepFeedback()

    def profiled_decode_ms(self, batch: int, context: int, sms: int) -> Estimate:
        """The profile's estimate, uncorrected: what measured steps are compared with."""
        return super().decode_ms(batch, context, sms)

    def decode_ms(self, batch: int, context: int, sms: int) -> Estimate:
        est = super().decode_ms(batch, context, sms)
        return dataclasses.replace(est, ms=est.ms * self.feedback.factor(sms))


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
        profile estimates ``estimated_ms``."""
        if self._last is not None:
            then, last_sms, last_est = self._last
            if last_sms == sms and now_s > then:
                self.feedback.observe(last_sms, last_est, (now_s - then) * 1e3)
        self._last = (now_s, sms, estimated_ms)

    def interrupt(self) -> None:
        self._last = None
