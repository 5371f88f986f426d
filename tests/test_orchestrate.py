"""Estimator, split policies, the temporal planner and the simulated benchmark (CPU only).

Most tests use a synthetic profile whose times follow the estimator's own model exactly
(``orchestrate_fixtures``), so every estimate between grid points has a known right answer.
"""

from __future__ import annotations

import random

import pytest

from bullet_kernels import colocation
from bullet_kernels.models.presets import preset_config
from bullet_kernels.orchestrate import (
    Estimator, EstimateError, MixWork, Profile, SLOPolicy, StaticPolicy, Work, held_out_errors, plan_mix,
    sequential_ms, sm_time_bound,
)
from bullet_kernels.orchestrate.estimator import interp
from bullet_kernels.orchestrate.profile import find_profile
from bullet_kernels.partition import SMSplit

from orchestrate_fixtures import GROUPS, SLOWDOWN, SPLITS, decode_ms, prefill_group_ms, synthetic_profile


@pytest.fixture(scope="module")
def est():
    return Estimator(synthetic_profile())


# -- interpolation --------------------------------------------------------------------------------


def test_interp_inside_outside_and_floor():
    assert interp([1, 3], [10, 30], 2) == (20, False)
    assert interp([1, 3], [10, 30], 5) == (50, True)
    y, ex = interp([10, 20], [1.0, 11.0], 0)  # the line crosses zero: floored, flagged
    assert ex and y == pytest.approx(0.25)


# -- estimator ------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,context,sms", [(8, 512, 132), (50, 1500, 132), (100, 3000, 40), (20, 800, 56), (128, 4096, 32)])
def test_decode_estimate_matches_the_closed_form_inside_the_grid(est, batch, context, sms):
    e = est.decode_ms(batch, context, sms)
    assert e.ms == pytest.approx(decode_ms(batch, context, sms), rel=1e-9) and not e.extrapolated


@pytest.mark.parametrize("tokens,group,sms", [(512, 0, 132), (3000, 1, 90), (1500, GROUPS - 1, 60)])
def test_prefill_estimate_matches_the_closed_form_inside_the_grid(est, tokens, group, sms):
    assert est.prefill_group_ms(tokens, group, sms).ms == pytest.approx(prefill_group_ms(tokens, group, sms), rel=1e-9)
    whole = est.prefill_ms(tokens, sms).ms
    assert whole == pytest.approx(sum(prefill_group_ms(tokens, g, sms) for g in range(GROUPS)), rel=1e-9)


def test_estimates_outside_the_grid_say_so(est):
    assert est.decode_ms(256, 1024, 132).extrapolated
    assert est.decode_ms(32, 1024, 16).extrapolated
    more = est.decode_ms(32, 1024, 200)  # more SMs than the GPU measured: flat
    assert more.extrapolated and more.ms == pytest.approx(decode_ms(32, 1024, 132))


def test_unanswerable_questions_raise(est):
    with pytest.raises(EstimateError, match="groups"):
        est.prefill_group_ms(1024, GROUPS, 132)
    with pytest.raises(ValueError, match=">= 1"):
        est.decode_ms(8, 512, 0)
    empty = synthetic_profile()
    empty.doc["decode"], empty.doc["prefill"] = [], []
    with pytest.raises(EstimateError, match="no decode or prefill points"):
        Estimator(empty)


def test_corun_slowdown_is_measured_or_flagged(est):
    assert est.slowdown("decode", 48) == (pytest.approx(SLOWDOWN["decode"]), True)
    assert est.corun(est.decode_ms(32, 1024, 48), "decode", 48).ms == pytest.approx(decode_ms(32, 1024, 48) * SLOWDOWN["decode"])
    bare = Estimator(synthetic_profile(with_corun=False))
    assert bare.slowdown("prefill", 48) == (1.0, False)
    assert not bare.corun(bare.decode_ms(32, 1024, 48), "decode", 48).corun_measured
    with pytest.raises(ValueError, match="lane"):
        est.slowdown("main", 48)


def test_held_out_error_is_small_where_the_model_is_exact():
    errs = held_out_errors(synthetic_profile())
    for grid in ("decode", "prefill", "corun"):
        assert errs[grid]["n"] > 0
        assert errs[grid]["median"] < 1e-6, grid
    # Edge points are extrapolations when held out and are counted as such.
    assert errs["decode"]["extrapolated"] > 0


# -- policies -------------------------------------------------------------------------------------


def corun_decode(split, batch=128, context=2048):
    return decode_ms(batch, context, split["decode"]) * SLOWDOWN["decode"]


def test_slo_policy_gives_decode_the_fewest_sms_within_tpot(est):
    for target in (30.0, 22.0, 17.0):
        policy = SLOPolicy(est, SPLITS, tpot_ms=target)
        d = policy.decide(Work(decode=(128, 2048), prefill_tokens=4096, prefill_groups_left=GROUPS))
        feasible = sorted((s for s in SPLITS if corun_decode(s) <= target), key=lambda s: s["decode"])
        assert d.feasible and d.split == feasible[0], target
        assert d.decode_ms == pytest.approx(corun_decode(d.split))


def test_slo_policy_falls_back_to_the_fastest_decode_lane_and_says_why(est):
    d = SLOPolicy(est, SPLITS, tpot_ms=1.0).decide(Work(decode=(128, 2048), prefill_tokens=4096, prefill_groups_left=2))
    assert not d.feasible and d.split == max(SPLITS, key=lambda s: s["decode"])
    assert "infeasible" in d.reason and "1.00 ms" in d.reason


def test_ttft_risk_is_reported(est):
    policy = SLOPolicy(est, SPLITS, tpot_ms=30.0)
    tight = policy.decide(Work(decode=(32, 1024), prefill_tokens=4096, prefill_groups_left=GROUPS, ttft_left_ms=1.0))
    loose = policy.decide(Work(decode=(32, 1024), prefill_tokens=4096, prefill_groups_left=GROUPS, ttft_left_ms=1e6))
    assert tight.ttft_at_risk and not loose.ttft_at_risk


def test_a_phase_alone_gets_the_whole_gpu(est):
    for policy in (SLOPolicy(est, SPLITS, tpot_ms=20), StaticPolicy(est, SPLITS[0])):
        assert policy.decide(Work(decode=(32, 1024))).split is None
        assert policy.decide(Work(prefill_tokens=2048, prefill_groups_left=1)).split is None
        assert policy.decide(Work()).reason == "idle"


def test_policies_refuse_bad_targets_and_splits(est):
    with pytest.raises(ValueError, match="TPOT"):
        SLOPolicy(est, SPLITS, tpot_ms=0)
    with pytest.raises(ValueError, match="TTFT"):
        SLOPolicy(est, SPLITS, tpot_ms=10, ttft_ms=-1)
    with pytest.raises(ValueError, match="'prefill' and 'decode'"):
        StaticPolicy(est, SMSplit(prefill=100, other=32))
    with pytest.raises(ValueError, match="at least one"):
        SLOPolicy(est, [], tpot_ms=10)


# -- the planner ----------------------------------------------------------------------------------


def check_plan(launches, work, groups, handoff):
    """Invariants every plan keeps, whatever the estimates."""
    assert [x.index for x in launches if x.phase == "prefill"] == list(range(groups))
    assert [x.index for x in launches if x.phase == "decode"] == list(range(work.decode_steps))
    last = {"prefill": None, "decode": None}
    for x in launches:
        other = "decode" if x.phase == "prefill" else "prefill"
        if last[other] is not None and not x.after_other:
            # overlapping the other chain is allowed only on the other lane of the same split
            assert x.split is not None and last[other].split == x.split
        if x.after_other:
            assert x.start_ms >= last[other].end_ms - 1e-9
        last[x.phase] = x
    if handoff:
        ends = {p: max(x.end_ms for x in launches if x.phase == p) for p in ("prefill", "decode") if last[p]}
        first_done = min(ends, key=ends.get)
        later = [x for x in launches if x.phase != first_done and x.start_ms >= ends[first_done] - 1e-9]
        assert all(x.split is None for x in later), "a lane whose partner finished must get the whole GPU"


def test_plans_keep_their_invariants_on_random_mixes(est):
    rng = random.Random(0)
    for _ in range(60):
        work = MixWork(prompt_tokens=rng.choice([512, 1024, 2048, 4096]), decode_batch=rng.choice([8, 32, 64, 128]),
                       context=rng.choice([512, 1024, 2048, 4096]), decode_steps=rng.randint(0, 12))
        slo = SLOPolicy(est, SPLITS, tpot_ms=rng.uniform(5, 40))
        check_plan(plan_mix(work, est, slo, handoff=True), work, GROUPS, True)
        static = StaticPolicy(est, rng.choice(SPLITS))
        launches = plan_mix(work, est, static, handoff=False)
        check_plan(launches, work, GROUPS, False)
        if work.decode_steps:
            assert {x.split for x in launches} == {static.splits[0]}


def test_mix_work_refuses_bad_shapes():
    with pytest.raises(ValueError, match="prompt_tokens"):
        MixWork(prompt_tokens=0, decode_batch=8, context=512, decode_steps=1)


def test_sm_time_bound_is_between_the_lanes_and_sequential(est):
    work = colocation.MIXES["A"]
    bound = sm_time_bound(work, est, SPLITS)
    seq = sequential_ms(work, est)
    assert max(est.prefill_ms(4096, 132).ms, 6 * est.decode_ms(128, 2048, 132).ms) <= bound["ms"] <= seq
    assert bound["speedup_vs_sequential"] == pytest.approx(seq / bound["ms"])


# -- the simulated benchmark ----------------------------------------------------------------------


def test_simulation_runs_every_split_mode_and_summarizes(est):
    plan = colocation.BenchPlan(splits=tuple(SPLITS))
    rows = colocation.simulate(plan, est)
    assert {r["mode"] for r in rows} == set(plan.modes(simulated=True))
    seq = next(r for r in rows if r["mix"] == "A" and r["mode"] == "sequential")
    assert seq["median_ms"] == pytest.approx(sequential_ms(colocation.MIXES["A"], est))
    summary = colocation.summarize(rows)
    for mix in ("A", "B"):
        s = summary[mix]
        assert s["baseline"] == "sequential" and s["orchestrated_speedup"] > 0
        assert s["bound_speedup"] >= 1
    assert "orchestrated" in colocation.table(rows, summary)


def test_bench_plan_refuses_unknown_mixes_and_bad_factors():
    with pytest.raises(ValueError, match="unknown mix"):
        colocation.BenchPlan(mixes=("C",))
    with pytest.raises(ValueError, match="tpot_factor"):
        colocation.BenchPlan(tpot_factor=1.0)


# -- the shipped profile ----------------------------------------------------------------------------


def test_shipped_h200_profile_is_valid_and_its_estimator_holds_out_well():
    """Data check of graphs/h200/llama-3.1-8b.json (measured): schema, model, and the
    estimator's leave-one-out error (the orchestrator issue's target: median <= 10%)."""
    prof = Profile.load(find_profile("h200", "llama-3.1-8b"))
    assert prof.complete and prof.device["sm_count"] == 132
    assert prof.check_matches(model_config=preset_config("llama-3.1-8b")) == []
    errs = held_out_errors(prof)
    for grid in ("decode", "prefill", "corun"):
        assert errs[grid]["n"] >= 10 and errs[grid]["median"] <= 0.10, (grid, errs[grid]["median"])


def test_sweep_mix_names_parse_and_bad_ones_are_refused():
    assert colocation.mix_work("p2048-b32-c1024") == MixWork(2048, 32, 1024, 6)
    assert colocation.mix_work("A") == colocation.MIXES["A"]
    with pytest.raises(ValueError, match="p<tokens>-b<batch>-c<context>"):
        colocation.BenchPlan(mixes=("p2048-b32",))


def test_interference_rows_from_the_shipped_h200_profile():
    """Slowdowns and work rates from the profile's own co-run and whole-GPU points."""
    from pathlib import Path

    from bullet_kernels.orchestrate import interference
    from bullet_kernels.orchestrate.profile import WHOLE_GPU, Profile

    profile = Profile.load(Path(__file__).resolve().parents[1] / "graphs/h200/llama-3.1-8b.json")
    rows = interference.interference_rows(profile)
    assert len(rows) == len(profile.corun) > 0
    r, c = rows[0], profile.corun[0]
    whole_p = next(p["ms"] for p in profile.prefill if p["split"] == WHOLE_GPU
                   and (p["tokens"], p["group"]) == (c["prefill"]["tokens"], c["prefill"]["group"]))
    whole_d = next(p["ms"] for p in profile.decode if p["split"] == WHOLE_GPU
                   and (p["batch"], p["context"]) == (c["decode"]["batch"], c["decode"]["context"]))
    assert r["work_rate"] == pytest.approx(whole_p / c["prefill"]["corun_ms"] + whole_d / c["decode"]["corun_ms"])
    assert r["decode_slowdown"] == pytest.approx(c["decode"]["corun_ms"] / c["decode"]["alone_ms"])
    for row in rows:  # interference only takes away: co-running is never faster than alone on a lane
        assert row["work_rate"] < row["work_rate_without_interference"]
    s = interference.summary(rows)
    assert set(s) == {row["split"] for row in rows}
    assert all(v["work_rate_best"] >= v["work_rate_median"] for v in s.values())
    text = interference.markdown(rows)
    assert text.count("\n") == len(rows) + 1 and "prefill100-decode32" in text
