"""Measured decode steps correcting the profile's (orchestrate.feedback), CPU only."""

from __future__ import annotations

import pytest

from bullet_kernels.orchestrate import Estimator, FeedbackEstimator, SLOPolicy, StepClock, StepFeedback, Work
from bullet_kernels.orchestrate.feedback import RATIO_RANGE

from orchestrate_fixtures import SPLITS, synthetic_profile


def test_factor_is_the_lanes_median_then_the_pooled_one_then_one():
    fb = StepFeedback(window=8, min_samples=3)
    assert fb.factor(32) == 1.0  # nothing measured: the profile as it is
    for measured in (15.0, 20.0, 200.0):  # one long step (a stall) does not move a median
        fb.observe(32, 10.0, measured)
    assert fb.factor(32) == pytest.approx(2.0)
    assert fb.factor(80) == pytest.approx(2.0)  # not measured: borrows every lane's median
    for _ in range(3):
        fb.observe(80, 10.0, 12.0)
    assert fb.factor(80) == pytest.approx(1.2) and fb.factor(32) == pytest.approx(2.0)
    assert fb.summary() == {32: {"samples": 3, "factor": 2.0}, 80: {"samples": 3, "factor": 1.2}}
    for _ in range(8):  # the window forgets: a lane that got faster is seen as faster
        fb.observe(32, 10.0, 10.0)
    assert fb.factor(32) == pytest.approx(1.0)
    fb.observe(48, 1.0, 1e6)
    assert max(fb._by_sms[48]) == RATIO_RANGE[1]  # a single ratio is clamped


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


def test_the_clock_times_launch_to_launch_on_one_lane_and_skips_switches():
    fb = StepFeedback(window=16, min_samples=1)
    clock = StepClock(fb)
    clock.launched(1.000, 32, 10.0)
    clock.launched(1.015, 32, 10.0)  # 15 ms for a 10 ms estimate
    assert fb.observed == 1 and fb.factor(32) == pytest.approx(1.5)
    clock.launched(1.030, 132, 5.0)  # another lane: the step in progress is not compared
    assert fb.observed == 1
    clock.interrupt()  # a group switch waited for both lanes
    clock.launched(2.000, 132, 5.0)
    clock.launched(2.008, 132, 5.0)
    assert fb.observed == 2 and fb.factor(132) == pytest.approx(1.6)


def test_the_policy_plans_with_measured_steps():
    """Where the host's steps are slower than the profile's, the same TPOT target gets more
    decode SMs; with feedback off (a plain Estimator) nothing changes."""
    profile = synthetic_profile()
    plain, corrected = Estimator(profile), FeedbackEstimator(profile)
    work = Work(decode=(64, 2048), prefill_tokens=2048, prefill_groups_left=2)
    splits = sorted(SPLITS, key=lambda s: s["decode"])
    step = {s["decode"]: plain.corun(plain.decode_ms(64, 2048, s["decode"]), "decode", s["decode"]).ms for s in splits}
    # a target the profile meets on the smallest decode lane, which at 1.5x only the next one meets
    small, next_ = step[splits[0]["decode"]], step[splits[1]["decode"]]
    tpot = (max(small, 1.5 * next_) + 1.5 * small) / 2
    assert small < tpot and 1.5 * next_ < tpot < 1.5 * small
    assert SLOPolicy(plain, splits, tpot_ms=tpot).decide(work).split == splits[0]
    for s in splits:
        for _ in range(8):
            corrected.feedback.observe(s["decode"], 10.0, 15.0)
    assert corrected.decode_ms(64, 2048, 40).ms == pytest.approx(1.5 * plain.decode_ms(64, 2048, 40).ms)
    assert corrected.profiled_decode_ms(64, 2048, 40) == plain.decode_ms(64, 2048, 40)
    decision = SLOPolicy(corrected, splits, tpot_ms=tpot).decide(work)
    assert decision.split == splits[1] and decision.decode_ms == pytest.approx(1.5 * step[splits[1]["decode"]])
