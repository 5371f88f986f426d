"""The TPOT target as a per-request mean (bullet_kernels.orchestrate.tpot_budget) and SLOPolicy's
"average" mode, on the shipped H200 profile."""

from __future__ import annotations

import pytest

from bullet_kernels.orchestrate import (CorunShare, Estimator, Profile, SLOPolicy, Work, corun_step_bound_ms,
                                        find_profile)
from bullet_kernels.orchestrate.policy import split_chooser
from bullet_kernels.orchestrate.profiler import DEFAULT_SPLITS


def test_the_share_is_taken_over_the_last_window_of_steps():
    share = CorunShare(window=4, min_steps=2)
    assert share.value() is None
    share.observe(True)
    assert share.value() is None  # fewer than min_steps
    share.observe(False)
    assert share.value() == 0.5
    for corun in (True, True, True):
        share.observe(corun)
    assert share.value() == 0.75 and share.counts() == (3, 4)  # the window of 4: F, T, T, T
    share.observe(True)
    assert share.value() == 1.0  # the False has left the window
    share.observe(False)
    assert share.value() == 0.75 and share.counts() == (3, 4)
    with pytest.raises(ValueError, match="min_steps"):
        CorunShare(window=4, min_steps=5)


def test_the_bound_keeps_the_mean_step_at_the_target():
    # half the steps alone at 6 ms: co-running ones may take 14 ms, and the mean is then 10
    bound = corun_step_bound_ms(10.0, 6.0, 0.5)
    assert bound == pytest.approx(14.0)
    assert 0.5 * bound + 0.5 * 6.0 == pytest.approx(10.0)
    assert corun_step_bound_ms(10.0, 6.0, 1.0) == 10.0  # every step co-runs: step mode's bound
    assert corun_step_bound_ms(10.0, 6.0, None) == 10.0  # no share yet
    assert corun_step_bound_ms(10.0, 12.0, 0.5) == 10.0  # alone already misses: never below the target
    # a rare prefill does not let decode starve: the share planned with is at least MIN_SHARE
    assert corun_step_bound_ms(10.0, 6.0, 0.01) == corun_step_bound_ms(10.0, 6.0, 0.25) == pytest.approx(22.0)


@pytest.mark.parametrize("args, match", [((0.0, 6.0, 0.5), "tpot_ms > 0"), ((10.0, -1.0, 0.5), "alone_ms"),
                                         ((10.0, 6.0, 1.5), r"\[0, 1\]"), ((10.0, 6.0, 0.5, 0.0), "min_share")])
def test_bad_bound_inputs_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        corun_step_bound_ms(*args)


def h200_policy(**kw):
    estimator = Estimator(Profile.load(find_profile("h200", "llama-3.1-8b")))
    return SLOPolicy(estimator, list(DEFAULT_SPLITS), **kw)


def test_average_mode_gives_prefill_more_sms_when_most_steps_run_alone():
    work = Work(decode=(32, 1024), prefill_tokens=1024, prefill_groups_left=8)
    step = h200_policy(tpot_ms=10.0).decide(work)
    average = h200_policy(tpot_ms=10.0, tpot_mode="average")
    assert average.decide(work).split == step.split  # no share observed yet: as step mode
    for i in range(256):
        average.corun_share.observe(i % 4 == 0)  # a quarter of the steps beside a prefill
    decision = average.decide(work)
    assert decision.split["decode"] < step.split["decode"] and decision.feasible
    assert decision.decode_ms > 10.0  # a co-running step over the target, paid for by the steps alone
    assert "average mode" not in decision.reason and "<=" in decision.reason
    for _ in range(256):
        average.corun_share.observe(True)  # now every step co-runs: back to step mode's choice
    assert average.decide(work).split == step.split


def test_the_mode_is_checked_and_a_cached_chooser_refuses_average_mode():
    with pytest.raises(ValueError, match="step, average"):
        h200_policy(tpot_ms=10.0, tpot_mode="mean")
    policy = h200_policy(tpot_ms=10.0)
    split_chooser(policy)  # step mode: cached decisions are fine
    policy.set_tpot_mode("average")
    with pytest.raises(ValueError, match="caches decisions"):
        split_chooser(policy)
    uncached = split_chooser(policy, cached=False)  # the caller feeds the policy: every call decides
    assert uncached.cache_info is None and uncached(32, 1000, 1000, 8) == policy.decide(
        Work(decode=(32, 1024), prefill_tokens=1024, prefill_groups_left=8)).split
    with pytest.raises(ValueError, match="TPOT mode"):
        policy.set_tpot_mode("")
    assert policy.tpot_mode == "average"
