"""bullet_sglang's launcher checks (CPU): its options, the SGLang setups it refuses before
anything starts, the SGLang version, and SGLang's extension points checked against the real
sglang 0.5.15 source (the wheel `scripts/install.sh` downloads)."""

from __future__ import annotations

import contextlib

import json
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from bullet_sglang.hooks import HOOK_POINTS, HookPoint, check_hook_points
from bullet_sglang.options import BulletOptions, UnsupportedSetup, check_supported, split_argv
from bullet_sglang.version import UnsupportedSGLang, check_sglang_version

WHEELS = Path(__file__).resolve().parents[1] / ".cache" / "sglang"


def test_our_options_are_split_from_sglangs():
    opts, rest = split_argv(["--model-path", "m", "--enable-bullet", "--bullet-tpot-slo-ms", "12",
                             "--bullet-partition=tpc", "--port", "30000"])
    assert opts == BulletOptions(enable=True, tpot_slo_ms=12.0, partition="tpc")
    assert rest == ["--model-path", "m", "--port", "30000"]
    assert BulletOptions.from_env({"BULLET_SGLANG_CONFIG": opts.to_env()}) == opts
    assert BulletOptions.from_env({}) is None
    assert split_argv(["--model-path", "m"]) == (BulletOptions(), ["--model-path", "m"])
    assert BulletOptions().step_feedback  # on unless asked otherwise
    off, _ = split_argv(["--enable-bullet", "--bullet-step-feedback", "off"])
    assert not off.step_feedback and BulletOptions.from_env({"BULLET_SGLANG_CONFIG": off.to_env()}) == off
    assert BulletOptions().overlap  # on since measured on the H200 (ea7b8de)
    assert not split_argv(["--enable-bullet", "--bullet-overlap", "off"])[0].overlap
    assert BulletOptions().tpot_mode == "step"  # until average is measured on the GPU
    average, _ = split_argv(["--enable-bullet", "--bullet-tpot-mode", "average"])
    assert average.tpot_mode == "average" and BulletOptions.from_env({"BULLET_SGLANG_CONFIG": average.to_env()}) == average
    assert BulletOptions().decode_linear == "cublaslt-target"  # the default since measured in SGLang (962cddb)
    plain, _ = split_argv(["--enable-bullet", "--bullet-decode-linear", "cublas"])
    assert plain.decode_linear == "cublas" and BulletOptions.from_env({"BULLET_SGLANG_CONFIG": plain.to_env()}) == plain


def test_the_launchers_tpot_modes_are_the_policys():
    from bullet_kernels.orchestrate import TPOT_MODES
    from bullet_sglang.options import TPOT_MODES as LAUNCHER_TPOT_MODES

    assert LAUNCHER_TPOT_MODES == TPOT_MODES
    from bullet_sglang.graph_runner import DECODE_LINEARS
    from bullet_sglang.options import DECODE_LINEARS as LAUNCHER_DECODE_LINEARS

    assert LAUNCHER_DECODE_LINEARS == DECODE_LINEARS


@pytest.mark.parametrize("argv,words", [
    (["--bullet-tpot-slo-ms", "10"], "needs --enable-bullet"),
    (["--enable-bullet", "--bullet-partition", "mps"], "green, tpc"),
    (["--enable-bullet", "--bullet-ttft-slo-ms", "0"], "must be > 0"),
    (["--enable-bullet", "--bullet-step-feedback", "yes"], "must be on or off, got 'yes'"),
    (["--enable-bullet", "--bullet-overlap=1"], "--bullet-overlap must be on or off, got '1'"),
    (["--enable-bullet", "--bullet-tpot-mode", "mean"], "--bullet-tpot-mode must be one of step, average, got 'mean'"),
    (["--enable-bullet", "--bullet-decode-linear", "triton"],
     "--bullet-decode-linear must be one of cublas, cublaslt-target, got 'triton'"),
])
def test_bad_bullet_options_are_refused(argv, words):
    with pytest.raises(UnsupportedSetup, match=words):
        split_argv(argv)


@pytest.mark.parametrize("sglang_argv,words", [
    (["--tp-size", "2"], "tensor parallel size 1"),
    (["--tp=4"], "tensor parallel size 1"),
    (["--dp-size", "2"], "--dp-size 1"),
    (["--speculative-algorithm", "EAGLE"], "speculative decoding"),
    (["--disaggregation-mode", "prefill"], "PD disaggregation"),
    (["--enable-pdmux"], "give one of them"),
    (["--chunked-prefill-size", "2048"], "chunked prefill, which it replaces"),
    (["--enable-mixed-chunk"], "fuses them into one batch"),
    (["--disable-cuda-graph-padding"], "never found"),
    (["--pdmux-config-path", "p.yaml"], "configures SGLang's own PD-multiplexing"),
    (["--grpc-mode"], "gRPC server"),
    (["--use-ray"], "Ray-managed"),
])
def test_incompatible_sglang_options_are_refused_with_bullet_only(sglang_argv, words):
    with pytest.raises(UnsupportedSetup, match=words):
        check_supported(BulletOptions(enable=True), sglang_argv)
    check_supported(BulletOptions(enable=False), sglang_argv)  # unmodified SGLang: its own business
    check_supported(BulletOptions(enable=True), ["--tp-size", "1", "--disaggregation-mode", "null"])


def test_sglang_version_is_checked(monkeypatch):
    assert check_sglang_version("0.5.15") == "0.5.15"
    with pytest.raises(UnsupportedSGLang, match="sglang 0.5.21 is installed.*0.5.15"):
        check_sglang_version("0.5.21")
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(UnsupportedSGLang, match="not installed"):
        check_sglang_version()


def test_the_launcher_refuses_before_importing_sglang():
    code = ("import sys; from bullet_sglang import launch_server as l; "
            "rc = l.main(['--model-path', 'm', '--enable-bullet', '--tp-size', '2']); "
            "print(rc, 'sglang' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "False"]
    assert "tensor parallel size 1" in out.stderr


def write(root: Path, rel: str, text: str) -> None:
    f = root / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)


def test_hook_checks_catch_moved_changed_and_missing_points(tmp_path):
    write(tmp_path, "sglang/a.py", "class S:\n    def run(self, batch, extra):\n        pass\n    MODE = 1\n"
                                   "def entry(x, *args, flag=False, **kw):\n    pass\n")
    points = [HookPoint("sglang/a.py", "S.run", ("self", "batch"), "w1"), HookPoint("sglang/a.py", "S.gone", ("self",), "w2"),
              HookPoint("sglang/a.py", "entry", ("x", "args", "flag", "kw"), "w3"), HookPoint("sglang/a.py", "S.MODE", None, "w4"),
              HookPoint("sglang/b.py", "f", (), "w5"), HookPoint("sglang/a.py", "S.MODE", ("self",), "w6")]
    problems = check_hook_points(tmp_path, points)
    assert len(problems) == 4, problems
    assert "S.run takes (self, batch, extra), we rely on (self, batch) (w1)" in problems[0]
    assert "S.gone is missing (w2)" in problems[1]
    assert "sglang/b.py is missing" in problems[2]
    assert "S.MODE is no longer a function (w6)" in problems[3]


def test_every_hook_point_holds_in_the_real_sglang_0_5_15(tmp_path):
    wheels = sorted(WHEELS.glob("sglang-0.5.15-*.whl"))
    assert wheels, f"no sglang 0.5.15 wheel in {WHEELS}: scripts/install.sh downloads it (pip download --no-deps)"
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(tmp_path, [n for n in z.namelist() if n.startswith("sglang/") and n.endswith(".py")])
    assert check_hook_points(tmp_path) == []
    assert len(HOOK_POINTS) >= 15


# -- the co-location inside SGLang: stream groups, the scheduler subclass, the launch-time setup --


def h200_policy(tpot_ms=10.0, estimator_class=None):
    from bullet_kernels.orchestrate import Estimator, Profile, SLOPolicy
    from bullet_kernels.orchestrate.profiler import DEFAULT_SPLITS
    from bullet_sglang.stream_groups import GroupPlan, candidate_splits

    estimator = (estimator_class or Estimator)(Profile.load(Path(__file__).resolve().parents[1] / "graphs/h200/llama-3.1-8b.json"))
    splits = candidate_splits(DEFAULT_SPLITS)
    return GroupPlan(splits, 132), SLOPolicy(estimator, list(splits), tpot_ms=tpot_ms), estimator


def test_stream_groups_follow_sglangs_order_and_our_policy():
    from bullet_kernels.orchestrate import Work
    from bullet_sglang.stream_groups import PREFILL_ALONE, choose_group

    plan, policy, _ = h200_policy()
    assert plan.size == 6 and plan.decode_alone == 5
    assert plan.sm_counts() == [(132, 0), (100, 32), (84, 48), (68, 64), (52, 80), (0, 132)]
    assert choose_group(plan, policy, None, None) == PREFILL_ALONE  # idle: SGLang's group 0
    assert choose_group(plan, policy, None, 4096, 4) == PREFILL_ALONE
    assert choose_group(plan, policy, (64, 2048), None) == plan.decode_alone
    for decode in [(8, 1024), (64, 2048), (128, 4096)]:  # both: the policy's own split, by index
        want = policy.decide(Work(decode=decode, prefill_tokens=2048, prefill_groups_left=4)).split
        got = choose_group(plan, policy, decode, 2048, 4)
        assert got == plan.splits.index(want) + 1 and plan.sm_counts()[got] == (want["prefill"], want["decode"])


def test_group_plan_and_layer_progress_refuse_what_cannot_be():
    from bullet_kernels.partition import SMSplit
    from bullet_sglang.stream_groups import GroupPlan, groups_left

    with pytest.raises(ValueError, match="needs 140 SMs; the GPU has 132"):
        GroupPlan((SMSplit(prefill=100, decode=40),), 132)
    with pytest.raises(ValueError, match="is not one of"):
        GroupPlan((SMSplit(prefill=100, decode=32),), 132).index_of(SMSplit(prefill=84, decode=48))
    assert [groups_left(done, 32, 4) for done in (0, 1, 8, 9, 31, 32)] == [4, 4, 3, 3, 1, 0]
    with pytest.raises(ValueError, match="bad prefill progress"):
        groups_left(33, 32, 4)


class FakeBatch:
    def __init__(self, lens=(), tokens=None, split_index=0):
        self.reqs = [types.SimpleNamespace(origin_input_ids=[0] * n, output_ids=[0] * 3) for n in lens]
        self.extend_num_tokens, self.split_index = tokens, split_index

    def is_empty(self):
        return not self.reqs

    def batch_size(self):
        return len(self.reqs)


def fake_pdmux():
    """Stands in for sglang.srt.multiplex.pdmux_context: the names the subclass uses."""
    mod = types.SimpleNamespace(STREAM_GROUPS=[], SM_COUNTS=[], current=None,
                                PDMuxConfig=lambda sm_group_num: types.SimpleNamespace(sm_group_num=sm_group_num))
    mod.set_current_stream_idx = lambda idx: setattr(mod, "current", idx)
    return mod


def test_the_scheduler_subclass_fills_pdmux_with_our_lanes_and_asks_our_policy():
    from bullet_kernels.orchestrate import Work
    from bullet_sglang.scheduler import bullet_scheduler_class

    plan, policy, estimator = h200_policy()
    switched = []

    class SGLangScheduler:  # the attributes of SGLang 0.5.15's Scheduler the subclass relies on
        def __init__(self):
            self.ps = types.SimpleNamespace(gpu_id=3, tp_size=1)
            self.model_config = types.SimpleNamespace(num_hidden_layers=32)
            runner = types.SimpleNamespace(update_decode_attn_backend=switched.append)
            self.tp_worker = types.SimpleNamespace(model_runner=runner)

    opened = []

    def open_groups(p, gpu_id):
        opened.append(gpu_id)
        return [f"group{i}" for i in range(p.size)]

    pdmux = fake_pdmux()
    cls = bullet_scheduler_class(SGLangScheduler, plan, policy, open_groups, pdmux, policy_groups=len(estimator.groups))
    s = cls()
    assert (s.gpu_id, s.tp_size) == (3, 1)  # 0.5.15 keeps them in self.ps; pdmux reads them here
    s.init_pdmux()
    assert opened == [3] and pdmux.STREAM_GROUPS == s.stream_groups == [f"group{i}" for i in range(6)]
    assert pdmux.SM_COUNTS == plan.sm_counts() and s.real_sm_group_num == 6 and pdmux.current == 0
    assert s.pdmux_config.sm_group_num == 6 and s.split_prefill_batch is None

    s.running_batch, s.split_prefill_batch = FakeBatch([1000] * 64), FakeBatch([2048], tokens=2048, split_index=8)
    want = policy.decide(Work(decode=(64, 1003), prefill_tokens=2048, prefill_groups_left=3)).split
    idx, group = s.adjust_stream_groups()
    assert idx == plan.splits.index(want) + 1 and group == f"group{idx}"
    # the turn that admits the prefill enqueues all its layers (pdmux runs budget // tokens of them)
    assert s.pdmux_config.split_forward_token_budget // 2048 == 32
    assert pdmux.current == idx and switched == [idx]  # the decode attention backend follows the group
    s.split_prefill_batch = None
    assert s.adjust_stream_groups() == (5, "group5")  # decode alone: the whole GPU
    s.running_batch = FakeBatch()
    assert s.adjust_stream_groups()[0] == 0
    s.gpu_id = 5  # a later SGLang that sets it itself keeps working
    assert s.gpu_id == 5 and s.ps.gpu_id == 3


def test_measured_decode_steps_correct_the_policy_inside_sglangs_loop():
    """With step feedback, each decode launch (pdmux's run_batch of the running batch) to the next
    on one group is a measured step; prefill launches and group switches are not; once SGLang's
    steps are measured slower than the profile, the policy gives decode more SMs."""
    from bullet_kernels.orchestrate import FeedbackEstimator
    from bullet_sglang.scheduler import bullet_scheduler_class

    plan, policy, estimator = h200_policy(tpot_ms=15.0, estimator_class=FeedbackEstimator)
    launched, now = [], [100.0]

    class SGLangScheduler:
        def __init__(self):
            self.ps = types.SimpleNamespace(gpu_id=0, tp_size=1)
            self.model_config = types.SimpleNamespace(num_hidden_layers=32)
            self.tp_worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(update_decode_attn_backend=id))

        def run_batch(self, batch):
            launched.append(batch)
            return "result"

    cls = bullet_scheduler_class(SGLangScheduler, plan, policy, lambda p, g: [f"group{i}" for i in range(p.size)],
                                 fake_pdmux(), policy_groups=len(estimator.groups), feedback=estimator.feedback,
                                 clock=lambda: now[0])
    s = cls()
    s.init_pdmux()
    s.running_batch, s.split_prefill_batch = FakeBatch([1000] * 16), FakeBatch([1024], tokens=1024)
    first, _ = s.adjust_stream_groups()
    decode_sms = plan.sm_counts()[first][1]
    assert first not in (0, plan.decode_alone)
    profiled = estimator.corun(estimator.profiled_decode_ms(16, 1024, decode_sms), "decode", decode_sms).ms
    for _ in range(10):  # SGLang's steps take twice the profile's
        assert s.run_batch(s.running_batch) == "result"
        assert s.run_batch(s.split_prefill_batch) == "result"  # the prefill's layers: not a decode step
        now[0] += 2 * profiled / 1e3
    assert len(launched) == 20 and estimator.feedback.summary() == {
        decode_sms: {"samples": 9, "offset_ms": pytest.approx(profiled, abs=1e-3)}}  # took twice: profiled ms more
    again, _ = s.adjust_stream_groups()  # the switch drops the step in progress
    s.run_batch(s.running_batch)
    assert estimator.feedback.observed == 9
    assert plan.sm_counts()[again][1] > decode_sms  # planned with the measured steps: more decode SMs
    s.split_prefill_batch = None
    assert s.adjust_stream_groups()[0] == plan.decode_alone
    now[0] += 1.0
    s.run_batch(s.running_batch)  # the whole GPU's first step: nothing to compare yet
    now[0] += 0.009
    s.run_batch(s.running_batch)
    assert set(estimator.feedback.summary()) == {decode_sms, 132}
    # every decode step also counted for the average TPOT mode: 11 beside the prefill, 2 alone
    assert policy.corun_share.counts() == (11, 13)


def test_overlap_turns_on_the_result_processors_skip():
    import dataclasses as dc

    from bullet_sglang.scheduler import bullet_scheduler_class

    @dc.dataclass(frozen=True)
    class Processor:  # SGLang's is a frozen dataclass; only its enable_overlap flag changes
        enable_overlap: bool
        other: str

    ran = []

    class SGLangScheduler:
        def __init__(self):  # in SGLang 0.5.15's order: pdmux set up before the result processor
            self.ps = types.SimpleNamespace(gpu_id=0, tp_size=1)
            self.init_pdmux()
            self.init_batch_result_processor()

        def init_batch_result_processor(self):
            self.batch_result_processor = Processor(False, "kept")

        def event_loop_pdmux(self):
            ran.append("pdmux's")

    plan, policy, estimator = h200_policy()
    make = lambda **kw: bullet_scheduler_class(SGLangScheduler, plan, policy, lambda p, g: [None] * p.size,  # noqa: E731
                                               fake_pdmux(), policy_groups=len(estimator.groups), **kw)
    plain = make()()
    plain.event_loop_pdmux()
    assert plain.batch_result_processor == Processor(False, "kept") and ran == ["pdmux's"]
    s = make(overlap=True)()
    assert s.batch_result_processor == Processor(True, "kept")  # its entry into our loop: tests/sglang_real


def test_set_internal_state_changes_the_policy_targets_and_leaves_sglangs_own_alone():
    from bullet_sglang.scheduler import bullet_scheduler_class

    plan, policy, estimator = h200_policy()

    class SGLangScheduler:
        def set_internal_state(self, recv_req):
            return ("sglang's own", recv_req.server_args)

    def output(updated, server_args):
        return {"updated": updated, "server_args": server_args}

    cls = bullet_scheduler_class(SGLangScheduler, plan, policy, lambda p, g: [], fake_pdmux(),
                                 policy_groups=len(estimator.groups), state_output=output)
    s = cls()
    req = lambda **kw: types.SimpleNamespace(server_args=kw)  # noqa: E731
    assert s.set_internal_state(req(pp_max_micro_batch_size=8)) == ("sglang's own", {"pp_max_micro_batch_size": 8})
    assert policy.tpot_ms != 12
    done = s.set_internal_state(req(bullet_tpot_slo_ms=12))
    now = {"bullet_tpot_slo_ms": 12.0, "bullet_tpot_mode": "step"}
    assert done == {"updated": True, "server_args": now} and policy.tpot_ms == 12.0
    for bad in (req(bullet_tpot_slo_ms=0), req(bullet_tpot_slo_ms="fast"), req(bullet_tpot_slo_ms=True),
                req(bullet_tpot_slo_ms=float("inf")), req(bullet_tpot_ms=12), req(bullet_ttft_slo_ms=800),
                req(bullet_tpot_slo_ms=14, pp_max_micro_batch_size=8), req(bullet_tpot_mode="mean"),
                req(bullet_tpot_slo_ms=14, bullet_tpot_mode=3)):
        assert s.set_internal_state(bad) == {"updated": False, "server_args": now}
    both = s.set_internal_state(req(bullet_tpot_slo_ms=15, bullet_tpot_mode="average"))
    assert both["updated"] and policy.tpot_ms == 15.0 and policy.tpot_mode == "average"


def test_launch_setup_finds_the_profile_of_this_gpu_and_model(tmp_path):
    from bullet_kernels.models.presets import write_model_dir
    from bullet_sglang.options import BulletOptions, UnsupportedSetup, sglang_argv_for_bullet
    from bullet_sglang.setup import build, resolve

    model = write_model_dir("llama-3.1-8b", tmp_path / "llama")
    opts = resolve(BulletOptions(enable=True, tpot_slo_ms=15.0), ["--model-path", str(model)], device="NVIDIA H200")
    assert opts.profile.endswith("graphs/h200/llama-3.1-8b.json")
    assert BulletOptions.from_env({"BULLET_SGLANG_CONFIG": opts.to_env()}) == opts  # travels to the children
    setup = build(opts)
    assert setup.plan.size == 6 and setup.policy.tpot_ms == 15.0 and setup.policy_groups >= 1
    from bullet_kernels.orchestrate import FeedbackEstimator
    assert isinstance(setup.policy.estimator, FeedbackEstimator) and setup.feedback is setup.policy.estimator.feedback
    plain = build(BulletOptions(enable=True, profile=opts.profile, step_feedback=False))
    assert plain.feedback is None and not isinstance(plain.policy.estimator, FeedbackEstimator)
    assert setup.policy.tpot_mode == "step"
    assert build(BulletOptions(enable=True, profile=opts.profile, tpot_mode="average")).policy.tpot_mode == "average"
    other = tmp_path / "shallower"
    other.mkdir()
    config = json.loads((model / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 16}))
    with pytest.raises(UnsupportedSetup, match="no bullet_kernels latency profile matches this GPU.*16 layers"):
        resolve(opts, ["--model-path", str(other)], device="NVIDIA H200")
    with pytest.raises(UnsupportedSetup, match="no bullet_kernels latency profile matches this GPU"):
        resolve(opts, ["--model-path", str(model)], device="NVIDIA H100 80GB HBM3")
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(UnsupportedSetup, match="runs LlamaForCausalLM models for now; this model is Qwen3ForCausalLM"):
        resolve(opts, ["--model-path", str(qwen)], device="NVIDIA H200")
    with pytest.raises(UnsupportedSetup, match="does not exist"):
        resolve(opts, ["--model-path", str(tmp_path / "nowhere")], device="NVIDIA H200")
    with pytest.raises(UnsupportedSetup, match="needs --model-path"):
        resolve(opts, [], device="NVIDIA H200")
    with pytest.raises(UnsupportedSetup, match="not resolved by the launcher"):
        build(BulletOptions(enable=True))
    assert sglang_argv_for_bullet(["--port", "1"]) == ["--port", "1", "--chunked-prefill-size", "-1",
                                                       "--disable-overlap-schedule"]
    assert sglang_argv_for_bullet(["--chunked-prefill-size", "-1", "--disable-overlap-schedule"]).count("-1") == 1


def test_lanes_confined_only_inside_our_launch_scope_are_refused():
    """The tpc library's hook mechanism limits SMs only inside bullet_kernels' launch scope, which
    SGLang never enters: such lanes would run on the whole GPU, so they are refused."""
    from bullet_sglang.child import lane_streams

    class PartitionSet:
        split = "prefill=100,decode=32"

        def __init__(self, needs_scope):
            self.needs_scope = needs_scope

        def stream(self, lane):
            return f"{lane}-stream"

    assert lane_streams(PartitionSet(False)) == ("prefill-stream", "decode-stream")
    with pytest.raises(RuntimeError, match="which SGLang does not enter; use --bullet-partition green"):
        lane_streams(PartitionSet(True))


def test_a_profile_the_policy_cannot_plan_with_is_refused_at_start(tmp_path):
    from bullet_kernels.orchestrate import Estimator, Profile
    from bullet_sglang.setup import build

    source = Path(__file__).resolve().parents[1] / "graphs/h200/llama-3.1-8b.json"
    doc = json.loads(source.read_text())
    assert build(BulletOptions(enable=True, profile=str(source))).policy_groups == len(Estimator(Profile.load(source)).groups) > 0
    doc["prefill"] = []  # measured no prefill at all
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(doc))
    with pytest.raises(UnsupportedSetup, match="broken.json"):
        build(BulletOptions(enable=True, profile=str(broken)))


def test_a_partition_backend_that_cannot_run_is_refused_before_sglang_starts(monkeypatch):
    import dataclasses as dc

    from bullet_kernels.device import DeviceInfo
    from bullet_kernels.partition.tpc import mechanisms
    from bullet_sglang.setup import check_partition

    import bullet_kernels.device

    monkeypatch.setattr(bullet_kernels.device, "describe_state", lambda index: (None, "the CUDA driver reports no GPU"))
    with pytest.raises(UnsupportedSetup, match="green cannot run on GPU 0: no GPU \\(the CUDA driver reports no GPU\\)"):
        check_partition("green", 0)
    h200 = DeviceInfo(index=0, name="NVIDIA H200", uuid="GPU-0", sm_count=132, tpc_count=66,
                      compute_capability=(9, 0), driver_api_version=13000, kernel_driver="580.159.04",
                      total_memory_bytes=141 << 30, l2_bytes=60 << 20, green_contexts=True,
                      green_unavailable_reason="", min_partition_sms=8, partition_alignment_sms=8)
    check_partition("green", 0, device=h200)  # runs
    no_green = dc.replace(h200, green_contexts=False, green_unavailable_reason="driver 535 has no green contexts")
    with pytest.raises(UnsupportedSetup, match="green cannot run on GPU 0: green contexts unsupported: driver 535"):
        check_partition("green", 0, device=no_green)
    from bullet_kernels.partition.tpc import native

    if native.unavailable_reason():  # our TPC library is not built here: that is the refusal
        with pytest.raises(UnsupportedSetup, match="--bullet-partition tpc cannot run"):
            check_partition("tpc", 0, device=h200)
        return
    monkeypatch.setattr(mechanisms, "choose", lambda lib, version: mechanisms.Choice("hook", "auto", why="no offset"))
    with pytest.raises(UnsupportedSetup, match="gets the hook mechanism \\(no offset\\).*use --bullet-partition green"):
        check_partition("tpc", 0, device=h200)
    monkeypatch.setattr(mechanisms, "choose", lambda lib, version: mechanisms.Choice("record", "auto", offset=0x51C))
    check_partition("tpc", 0, device=h200)


def test_parsed_arguments_are_refused_like_the_command_line():
    """check_parsed reads SGLang's parsed ServerArgs (abbreviated options included: --dp 2 parses
    as dp_size 2); here a namespace with ServerArgs' field names and defaults."""
    from bullet_sglang.options import check_parsed

    defaults = dict(tp_size=1, pp_size=1, dp_size=1, speculative_algorithm=None, disaggregation_mode="null",
                    enable_pdmux=False, disable_cuda_graph_padding=False, pdmux_config_path=None,
                    enable_mixed_chunk=False, grpc_mode=False, use_ray=False)
    check_parsed(types.SimpleNamespace(**defaults))
    for change, words in ((dict(dp_size=2), "--dp-size 1 only"), (dict(tp_size=2), "tensor parallel size 1"),
                          (dict(speculative_algorithm="EAGLE"), "speculative decoding"),
                          (dict(disaggregation_mode="prefill"), "PD disaggregation"),
                          (dict(enable_pdmux=True), "give one of them"),
                          (dict(disable_cuda_graph_padding=True), "padded"),
                          (dict(use_ray=True), "Ray-managed")):
        with pytest.raises(UnsupportedSetup, match=words):
            check_parsed(types.SimpleNamespace(**{**defaults, **change}))


def test_the_scheduler_is_not_idle_while_a_split_prefill_or_an_overlapped_step_is_in_flight():
    from bullet_sglang.scheduler import bullet_scheduler_class

    class SGLangScheduler:
        def __init__(self):
            self.split_prefill_batch = None

        def is_fully_idle(self, for_health_check=False):  # SGLang's own answer: its queues are empty
            return True

    plan, policy, estimator = h200_policy()
    s = bullet_scheduler_class(SGLangScheduler, plan, policy, lambda p, g: [None] * p.size, fake_pdmux(),
                               policy_groups=len(estimator.groups))()
    assert s.is_fully_idle() and s.is_fully_idle(for_health_check=True)
    s.split_prefill_batch = object()
    assert not s.is_fully_idle()
    s.split_prefill_batch, s.bullet_step_in_flight = None, True
    assert not s.is_fully_idle(for_health_check=True)


def test_lane_targeted_decode_graphs_capture_each_split_inside_its_lanes_target(monkeypatch):
    """--bullet-decode-linear cublaslt-target: SGLang's per-stream-group capture runs inside
    cuBLASLt's SM-count target of that group's decode lane; whole-GPU groups as SGLang does."""
    import types

    from bullet_kernels.kernels import blas_target
    from bullet_sglang import graph_runner
    from bullet_sglang.stream_groups import GroupPlan

    targets, active = [], [None]

    @contextlib.contextmanager
    def fake_target(sms):  # the real one sets torch's process-wide cuBLASLt carveout (CUDA)
        targets.append(sms)
        active[0] = sms
        try:
            yield
        finally:
            active[0] = None

    monkeypatch.setattr(blas_target, "cublaslt_sm_target", fake_target)

    class SGLangRunner:  # stands in for DecodeCudaGraphRunner: the capture loop calls this per group
        def __init__(self):
            self.captured = []

        def _capture_one_stream(self, stream_idx=None):
            self.captured.append((stream_idx, active[0]))

    plan = GroupPlan(tuple(f"prefill={132 - d},decode={d}" for d in (32, 48)), 132)
    module = types.SimpleNamespace(DecodeCudaGraphRunner=SGLangRunner)
    cls = graph_runner.install(module, [d for _, d in plan.sm_counts()], plan.sm_count)
    assert module.DecodeCudaGraphRunner is cls and issubclass(cls, SGLangRunner)
    runner = cls()
    for i in range(plan.size):
        runner._capture_one_stream(i)
    runner._capture_one_stream()  # no pdmux: one stream, as SGLang
    assert targets == [32, 48]
    assert runner.captured == [(0, None), (1, 32), (2, 48), (3, None), (None, None)]
    with pytest.raises(ValueError, match="ints in 0..132"):
        graph_runner.lane_targeted_runner_class(SGLangRunner, [0, 133], 132)
