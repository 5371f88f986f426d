"""Measured decode steps correcting the profile's (orchestrate.feedback), CPU only."""

from __future__ import annotations

import pytest

from bullet_kernels.orchestrate import Estimator, FeedbackEstimator, SLOPolicy, StepClock, StepFeedback, Work
from bullet_kernels.orchestrate.feedback import FLOOR, MAX_EXTRA

from orchestrate_fixtures import SPLITS, synthetic_profile


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_offset_is_the_lanes_median_then_the_pooled_one_then_zero():
    clock = Clock()
    fb = StepFeedback(window=8, min_samples=3, clock=clock)
    assert fb.offset_ms(32) == 0.0 and fb.corrected_ms(32, 10.0) == 10.0  # nothing measured: the profile
    for measured in (14.0, 15.0, 200.0):  # one long step (a stall) does not move a median
        fb.observe(32, 10.0, measured)
    assert fb.offset_ms(32) == pytest.approx(5.0) and fb.corrected_ms(32, 12.0) == pytest.approx(17.0)
    assert fb.offset_ms(80) == pytest.approx(5.0)  # not measured: borrows every lane's median
    for _ in range(3):
        fb.observe(80, 6.0, 7.0)
    assert fb.offset_ms(80) == pytest.approx(1.0) and fb.offset_ms(32) == pytest.approx(5.0)
    assert fb.summary() == {32: {"samples": 3, "offset_ms": 5.0}, 80: {"samples": 3, "offset_ms": 1.0}}
    for _ in range(8):  # the window forgets: a lane that got faster is seen as faster
        fb.observe(32, 10.0, 10.0)
    assert fb.offset_ms(32) == 0.0
    fb.observe(48, 1.0, 1e6)
    assert fb._by_sms[48][-1][1] == MAX_EXTRA * 1.0  # a single sample is clamped
    for _ in range(3):
        fb.observe(16, 10.0, 1.0)  # faster than the profile: never below its floor
    assert fb.corrected_ms(16, 10.0) == FLOOR * 10.0


def test_samples_expire_so_an_overestimated_lane_is_tried_again():
    clock = Clock()
    fb = StepFeedback(window=64, min_samples=2, max_age_s=30.0, clock=clock)
    for _ in range(4):
        fb.observe(32, 10.0, 30.0)  # a slow spell on the 32-SM lane
    clock.now += 20
    for _ in range(4):
        fb.observe(132, 5.0, 9.0)
    assert fb.offset_ms(32) == 20.0
    clock.now += 15  # the 32-SM samples are 35 s old: forgotten, the pooled (fresh) median answers
    assert fb.offset_ms(32) == 4.0 and fb.summary()[32]["samples"] == 0
    clock.now += 60
    assert fb.offset_ms(32) == 0.0  # nothing fresh anywhere: the profile as it is


@pytest.mark.parametrize("args,words", [
    ((0, 1.0, 1.0), "positive whole number of SMs"),
    ((True, 1.0, 1.0), "positive whole number of SMs"),
    ((32, 0.0, 1.0), "estimated_ms must be a positive finite time"),
    ((32, 1.0, float("nan")), "measured_ms must be a positive finite time"),
    ((32, 1.0, float("inf")), "measured_ms must be a positive finite time"),
])
def test_bad_observations_are_refused(args, words):
    fb = StepFeedback()
    with pytest.raises(ValueError, match=words):
        fb.observe(*args)
    assert fb.observed == 0
    with pytest.raises(ValueError, match="min_samples"):
        StepFeedback(window=4, min_samples=5)
    with pytest.raises(ValueError, match="max_age_s"):
        StepFeedback(max_age_s=0)


def test_the_clock_times_launch_to_launch_on_one_lane_and_skips_switches():
    fb = StepFeedback(window=16, min_samples=1)
    clock = StepClock(fb)
    clock.launched(1.000, 32, 10.0)
    clock.launched(1.015, 32, 10.0)  # 15 ms for a 10 ms estimate
    assert fb.observed == 1 and fb.offset_ms(32) == pytest.approx(5.0)
    clock.launched(1.030, 132, 5.0)  # another lane: the step in progress is not compared
    assert fb.observed == 1
    clock.interrupt()  # a group switch waited for both lanes
    clock.launched(2.000, 132, 5.0)
    clock.launched(2.008, 132, 5.0)
    assert fb.observed == 2 and fb.offset_ms(132) == pytest.approx(3.0)
    # in a server's step path it never raises: an estimate it cannot use is just not compared
    clock.interrupt()
    clock.launched(3.000, 132, float("nan"))
    clock.launched(3.010, 132, 5.0)  # the step after it is not compared with a NaN
    clock.launched(3.020, 132, 0.0)  # counted: the 3.010 step took 10 ms for its 5 ms estimate
    clock.launched(3.030, 132, 5.0)  # not counted: the 3.020 step's estimate was 0
    assert fb.observed == 3


def test_the_policy_plans_with_measured_steps():
    """Where the host's steps take longer than the profile's, the same TPOT target gets more
    decode SMs; with feedback off (a plain Estimator) nothing changes."""
    profile = synthetic_profile()
    plain, corrected = Estimator(profile), FeedbackEstimator(profile)
    work = Work(decode=(64, 2048), prefill_tokens=2048, prefill_groups_left=2)
    splits = sorted(SPLITS, key=lambda s: s["decode"])
    step = {s["decode"]: plain.corun(plain.decode_ms(64, 2048, s["decode"]), "decode", s["decode"]).ms for s in splits}
    extra = 3.0  # measured: every decode step 3 ms longer than the profile says
    small, next_ = step[splits[0]["decode"]], step[splits[1]["decode"]]
    slowdown = small / plain.decode_ms(64, 2048, splits[0]["decode"]).ms  # the profile's co-run factor
    tpot = (max(small, next_ + extra * slowdown) + small + extra * slowdown) / 2
    assert small < tpot < small + extra * slowdown and next_ + extra * slowdown < tpot
    assert SLOPolicy(plain, splits, tpot_ms=tpot).decide(work).split == splits[0]
    for s in splits:
        for _ in range(8):
            corrected.feedback.observe(s["decode"], 10.0, 10.0 + extra)
    assert corrected.decode_ms(64, 2048, 40).ms == pytest.approx(plain.decode_ms(64, 2048, 40).ms + extra)
    assert corrected.profiled_decode_ms(64, 2048, 40) == plain.decode_ms(64, 2048, 40)
    decision = SLOPolicy(corrected, splits, tpot_ms=tpot).decide(work)
    assert decision.split == splits[1]
