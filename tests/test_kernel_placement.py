"""Kernel-level placement (GEMMs of a decode graph on another lane): keys, refusals, the fork/join
order and the co-location modes, all on the CPU (the GPU half is test_kernel_placement_gpu.py)."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from bullet_kernels import colocation, kernels
from bullet_kernels.config import EngineConfig
from bullet_kernels.engine import GraphKey, ModelGraphs, ModelRunner, Placement
from bullet_kernels.engine.graph_bank import GraphBank
from bullet_kernels.engine.kernel_lanes import GemmFork, backend_refusal, check_gemm_lane, gemms_on
from bullet_kernels.errors import CaptureError, UnsupportedError
from bullet_kernels.kernels.sizing import current_sm_budget
from bullet_kernels.models import random_model
from bullet_kernels.orchestrate import Estimator
from bullet_kernels.partition import SMSplit

from orchestrate_fixtures import synthetic_profile

HOME_SPLIT, GEMM_SPLIT = SMSplit(prefill=100, decode=32), SMSplit(prefill=68, decode=64)
HOME, GEMM = Placement(HOME_SPLIT, "decode"), Placement(GEMM_SPLIT, "decode")


# -- keys ---------------------------------------------------------------------------------------


def test_a_gemm_lane_is_part_of_the_key_and_shown_in_its_name():
    plain = GraphKey("decode", 128, HOME_SPLIT, "decode")
    placed = GraphKey("decode", 128, HOME_SPLIT, "decode", gemm_lane=GEMM)
    assert plain != placed and len({plain, placed}) == 2  # both coexist in one bank
    assert str(plain) == "decode[128]@prefill100-decode32:decode/g0"  # unchanged without placement
    assert str(placed) == "decode[128]@prefill100-decode32:decode+gemm@prefill68-decode64:decode/g0"
    assert placed.placement == HOME
    whole = GraphKey("decode", 8, HOME_SPLIT, "decode", gemm_lane=Placement.WHOLE_GPU)
    assert str(whole).endswith("+gemm@whole-gpu/g0")


def test_prefill_whole_gpu_homes_and_the_home_lane_itself_are_refused():
    with pytest.raises(ValueError, match="decode graphs only, not prefill"):
        GraphKey("prefill", 512, HOME_SPLIT, "prefill", gemm_lane=GEMM)
    with pytest.raises(ValueError, match="already runs its GEMMs on every SM"):
        GraphKey("decode", 8, None, "main", gemm_lane=GEMM)
    with pytest.raises(ValueError, match="is the graph's own lane"):
        GraphKey("decode", 8, HOME_SPLIT, "decode", gemm_lane=HOME)
    with pytest.raises(TypeError, match="must be a Placement"):
        GraphKey("decode", 8, HOME_SPLIT, "decode", gemm_lane="prefill=68,decode=64")
    check_gemm_lane("prefill", HOME, None)  # no GEMM lane: anything goes


def test_backend_refusal_names_the_hook_and_what_to_use():
    assert backend_refusal("green", False) == ""
    assert backend_refusal("tpc", False) == ""  # record lanes: the mask travels with the stream
    why = backend_refusal("tpc", True)
    assert "launch-hook" in why and "backend='green'" in why and "upload" in why


# -- the fork/join runner ----------------------------------------------------------------------


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")


def make_fork(log, sms=64):
    home, gemm = FakeStream("home", log), FakeStream("gemm", log)
    current = [home]

    class Use:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            current.append(self.stream)
            log.append(f"on {self.stream.name}")

        def __exit__(self, *exc):
            current.pop()
            log.append(f"back to {current[-1].name}")

    return GemmFork(gemm, sms, current_stream=lambda: current[-1], use_stream=Use)


def test_each_gemm_forks_runs_on_the_gemm_lane_with_its_budget_then_joins():
    log = []
    fork = make_fork(log, sms=64)

    def gemm():
        log.append(f"gemm with budget {current_sm_budget()}")
        return "out"

    assert fork(gemm) == "out" and fork.calls == 1
    assert log == ["gemm waits home", "on gemm", "gemm with budget 64", "back to home", "home waits gemm"]


def test_kernels_linear_goes_through_the_fork_and_computes_the_same():
    log = []
    fork = make_fork(log)
    x, w = torch.randn(4, 8), torch.randn(16, 8)
    with gemms_on(fork):
        y = kernels.linear(x, w)
    kernels.linear(x, w)  # outside the scope: not forked
    assert fork.calls == 1 and log[0] == "gemm waits home" and log[-1] == "home waits gemm"
    torch.testing.assert_close(y, F.linear(x, w))
    with gemms_on(None):
        kernels.linear(x, w)
    assert fork.calls == 1
    with pytest.raises(ValueError, match="at least one SM"):
        GemmFork(object(), 0)


# -- the bank's refusals (no GPU work happens before them) ---------------------------------------


class FakeSet:
    def __init__(self, split, needs_scope):
        self.split, self.needs_scope, self.closed = split, needs_scope, False


class FakePartitioner:
    verify = False

    def __init__(self, backend, opened, needs_scope=False):
        self.backend = types.SimpleNamespace(name=backend)
        self._sets = {s: FakeSet(s, needs_scope) for s in opened}

    def open_sets(self):
        return list(self._sets.values())

    def get(self, split):
        return self._sets.setdefault(split, FakeSet(split, False))


@pytest.fixture
def bank_on(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the bank's constructor asks only this
    return lambda partitioner: GraphBank(partitioner, device_index=0, verify_graphs=False)


def test_a_gemm_lane_of_a_split_not_opened_is_refused(bank_on):
    bank = bank_on(FakePartitioner("green", [HOME_SPLIT]))
    key = GraphKey("decode", 8, HOME_SPLIT, "decode", gemm_lane=GEMM)
    with pytest.raises(CaptureError, match="prefill68-decode64 is not open.*up front"):
        bank.capture(key, lambda: None)
    with pytest.raises(CaptureError, match="not open"):
        bank_on(None).check_kernel_placement(key)


def test_tpc_hook_lanes_refuse_kernel_placement_and_record_lanes_allow_it(bank_on):
    key = GraphKey("decode", 8, HOME_SPLIT, "decode", gemm_lane=GEMM)
    hook = bank_on(FakePartitioner("tpc", [HOME_SPLIT, GEMM_SPLIT], needs_scope=True))
    with pytest.raises(UnsupportedError, match="kernel-level placement refused: the tpc backend's launch-hook"):
        hook.capture(key, lambda: None)
    bank_on(FakePartitioner("tpc", [HOME_SPLIT, GEMM_SPLIT])).check_kernel_placement(key)
    bank_on(FakePartitioner("green", [HOME_SPLIT, GEMM_SPLIT])).check_kernel_placement(key)
    whole = GraphKey("decode", 8, HOME_SPLIT, "decode", gemm_lane=Placement.WHOLE_GPU)
    bank_on(FakePartitioner("green", [HOME_SPLIT])).check_kernel_placement(whole)  # needs no second split
    plain = GraphKey("decode", 8, HOME_SPLIT, "decode")
    hook.check_kernel_placement(plain)  # without a GEMM lane nothing is refused


# -- model graphs and the runner ---------------------------------------------------------------


def test_model_graphs_capture_places_decode_only():
    model = types.SimpleNamespace(config=types.SimpleNamespace(num_layers=2))
    graphs = ModelGraphs(model, bank=None, cfg=EngineConfig(), max_pages=4)
    with pytest.raises(ValueError, match=r"places decode graphs only; capture with phases=\('decode',\)"):
        graphs.capture(HOME, phases=("decode", "prefill"), gemm_lane=GEMM)
    assert graphs.key("decode", 8, HOME, gemm_lane=GEMM) == GraphKey("decode", 8, HOME_SPLIT, "decode", gemm_lane=GEMM)
    assert graphs.key("decode", 8, HOME).gemm_lane is None


def test_runner_refuses_a_gemm_lane_on_prefill_and_on_the_whole_gpu_even_without_a_gpu():
    model = random_model("tiny-llama3", seed=0, dtype=torch.float32)
    runner = ModelRunner(model, EngineConfig(kv_num_pages=32, page_size=4))
    runner.reserve([("a", [1, 2, 3])])
    ids, batch = runner.plan_prefill([("a", [1, 2, 3])])
    with pytest.raises(ValueError, match="decode graphs only, not prefill"):
        runner.prepare(ids, batch, HOME, gemm_lane=GEMM)
    runner.reserve([("a", [4])])
    ids, batch = runner.plan_decode(["a"], [4])
    with pytest.raises(ValueError, match="already runs its GEMMs on every SM"):
        runner.prepare(ids, batch, None, gemm_lane=GEMM)
    if not torch.cuda.is_available():  # the eager fallback runs every kernel on the home lane
        step = runner.prepare(ids, batch, HOME, gemm_lane=GEMM)
        assert step.eager_reason == "no GPU"


# -- the co-location modes ----------------------------------------------------------------------


def test_default_plan_has_both_placement_modes_after_their_plain_modes():
    plan = colocation.BenchPlan()
    modes = plan.modes()
    placed = ["static-prefill100-decode32+gemm@prefill68-decode64", "static-prefill84-decode48+gemm@prefill52-decode80"]
    assert [m for m in modes if "+gemm@" in m] == placed
    for m in placed:
        assert modes.index(plan.plain_static(m)) < modes.index(m) < modes.index("orchestrated")
    assert not any("+gemm@" in m for m in plan.modes(simulated=True))
    assert plan.gemm_lane_of(placed[0]) == (HOME_SPLIT, GEMM)
    assert plan.split_of(placed[0]) == HOME_SPLIT and plan.gemm_lane_of("static-prefill100-decode32") is None
    assert set(plan.all_splits) == set(plan.splits)  # both GEMM splits are candidates already


def test_plan_gemm_lanes_validation_and_whole_gpu_lanes():
    only = colocation.BenchPlan(splits=("prefill=100,decode=32",))
    assert only.gemm_lanes == ((HOME_SPLIT, GEMM_SPLIT),)  # defaults follow the candidate splits
    assert only.all_splits == (HOME_SPLIT, GEMM_SPLIT)  # the GEMM split opens up front too
    whole = colocation.BenchPlan(splits=("prefill=100,decode=32",), gemm_lanes=(("prefill=100,decode=32", "whole-gpu"),))
    assert whole.modes()[-2] == "static-prefill100-decode32+gemm@whole-gpu"
    assert whole.gemm_lane_of(whole.modes()[-2]) == (HOME_SPLIT, Placement.WHOLE_GPU)
    assert whole.all_splits == (HOME_SPLIT,)
    with pytest.raises(ValueError, match="home split must be one of the plan's splits"):
        colocation.BenchPlan(splits=("prefill=100,decode=32",), gemm_lanes=(("prefill=84,decode=48", "prefill=52,decode=80"),))
    with pytest.raises(ValueError, match="plain static mode"):
        colocation.BenchPlan(gemm_lanes=(("prefill=100,decode=32", "prefill=100,decode=32"),))
    with pytest.raises(ValueError, match="exactly the lanes"):
        colocation.BenchPlan(gemm_lanes=(("prefill=100,decode=32", "a=68,b=64"),))
    with pytest.raises(ValueError, match="not one of this plan's kernel-placement modes"):
        only.gemm_lane_of("static-prefill100-decode32+gemm@prefill52-decode80")
    assert colocation.BenchPlan(gemm_lanes=()).modes(simulated=False)[-2] == "static-prefill52-decode80"


def test_simulation_leaves_placement_out_and_plans_it_as_its_static_split():
    est = Estimator(synthetic_profile())
    plan = colocation.BenchPlan()
    rows = colocation.simulate(plan, est)
    assert {r["mode"] for r in rows} == set(plan.modes(simulated=True))
    placed = "static-prefill100-decode32+gemm@prefill68-decode64"
    work = colocation.mix_work("A")
    assert colocation.plan_mode(placed, work, est, plan) == colocation.plan_mode("static-prefill100-decode32", work, est, plan)


def row(mode, ms, **extra):
    return {"mix": "A", "mode": mode, "simulated": False, "median_ms": ms, "bound_ms": 50.0, **extra}


def test_summary_and_table_compare_each_placement_mode_with_its_plain_static_mode():
    placed, plain = "static-prefill100-decode32+gemm@prefill68-decode64", "static-prefill100-decode32"
    rows = [row("sequential", 100.0), row(plain, 80.0, decode_step_median_ms=12.0, prefill_done_ms=70.0),
            row(placed, 76.0, decode_step_median_ms=10.0, prefill_done_ms=72.0, decode_logits_max_abs_diff=0.01)]
    summary = colocation.summarize(rows)["A"]
    assert summary["best_static"] == plain  # plain static modes only
    g = summary["gemm_placement"][placed]
    assert g["against"] == plain and g["wins"] and g["speedup"] == pytest.approx(80 / 76)
    assert g["decode_step_median_ms_plain"] == 12.0 and g["decode_step_median_ms_placed"] == 10.0
    text = colocation.table(rows, {"A": summary})
    assert f"{placed} vs {plain}: x1.053 (wins; decode step 12.00 -> 10.00 ms, prefill done 70.0 -> 72.0 ms" in text
    losing = colocation.summarize([row("sequential", 100.0), row(plain, 80.0), row(placed, 90.0)])["A"]
    assert not losing["gemm_placement"][placed]["wins"]
    assert "gemm_placement" not in colocation.summarize(rows[:2])["A"]


class FakeMixBench:
    """What ModeRun asks of a MixBench, without a GPU: the plan, one logits buffer per phase."""

    def __init__(self):
        self.plan, self.decode_reference = colocation.BenchPlan(), {}
        self.logits = torch.zeros(128, 10)

    def _split_mode(self, mode, work):
        return (lambda: None), ["a launch"]

    def _logits(self, phase, bucket):
        assert phase == "decode" and bucket == 128
        return self.logits


def test_a_placement_mode_s_decode_logits_are_compared_with_its_plain_static_mode():
    bench = FakeMixBench()
    plain, placed = "static-prefill100-decode32", "static-prefill100-decode32+gemm@prefill68-decode64"
    bench.logits = torch.arange(1280.0).reshape(128, 10)
    assert colocation.ModeRun(bench, "A", plain).decode_fields() == {}
    assert colocation.ModeRun(bench, "A", "static-prefill68-decode64").decode_fields() == {}  # nobody's reference
    assert set(bench.decode_reference) == {("A", plain)}
    bench.logits = bench.logits + 0.25
    fields = colocation.ModeRun(bench, "A", placed).decode_fields()
    assert fields["decode_reference_mode"] == plain
    assert fields["decode_logits_max_abs_diff"] == pytest.approx(0.25) and fields["decode_argmax_agreement"] == 1.0
    other = "static-prefill84-decode48+gemm@prefill52-decode80"  # its plain mode has not run
    assert colocation.ModeRun(bench, "A", other).decode_fields() == {"decode_reference_mode": None}


def test_releasing_a_placement_drops_the_graphs_whose_gemms_run_there():
    """Before Partitioner.release(split): no graph may keep kernels on the released lanes."""
    plain_home = GraphKey("decode", 8, HOME_SPLIT, "decode")
    placed = GraphKey("decode", 8, HOME_SPLIT, "decode", gemm_lane=GEMM)
    plain_gemm_split = GraphKey("decode", 8, GEMM_SPLIT, "decode")
    other = GraphKey("prefill", 512, GEMM_SPLIT, "prefill")
    kept = [plain_home, placed, plain_gemm_split, other]

    class Bank:  # the one method ModelGraphs.release uses
        def release(self, where):
            dropped = [k for k in kept if where is None or where(k)]
            for k in dropped:
                kept.remove(k)
            return len(dropped)

    graphs = ModelGraphs.__new__(ModelGraphs)
    graphs.bank = Bank()
    assert graphs.release(GEMM) == 2  # the placed graph's GEMMs and the plain graph on that lane
    assert kept == [plain_home, other]
    assert graphs.release(HOME) == 1 and kept == [other]
