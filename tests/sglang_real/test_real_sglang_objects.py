"""bullet_sglang against the real sglang 0.5.15 (CPU): its live hook points, its argument parser and
validation, the partition plan from the launcher's arguments, and our scheduler subclass built from
SGLang's real ``Scheduler`` and driven with real ``Req`` and ``ScheduleBatch`` objects.

Run with .venv-sglang's python (``bash scripts/sglang_cpu_env.sh``; tests/test_sglang_real_env.py
does both). What is not SGLang's real object here, and why:
- ``--device cpu`` is added to the launcher's argv: SGLang refuses to parse arguments on a machine
  with no accelerator otherwise (it looks for one to fill in ``device``);
- the KV cache and request pools are SGLang's own classes, allocated on the CPU and tiny;
- the stream groups are plain objects, not CUDA streams (``open_groups`` is the GPU part), and the
  model runner (its attention backends are GPU state) is a recorder of the group it is told.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
from array import array
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang", reason="the real sglang is in its own environment: bash scripts/sglang_cpu_env.sh, "
                    "then tests/test_sglang_real_env.py runs this file with its python")

import torch  # noqa: E402

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.distributed.parallel_state_wrapper import ParallelState
from sglang.srt.managers import scheduler as sglang_scheduler
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.chunk_cache import ChunkCache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.multiplex import pdmux_context
from sglang.srt.multiplex.multiplexing_mixin import SchedulerMultiplexMixin
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import ServerArgs, prepare_server_args, set_global_server_args_for_scheduler
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

from bullet_sglang.hooks import HOOK_POINTS
from bullet_sglang.options import BulletOptions, UnsupportedSetup, check_supported, split_argv, sglang_argv_for_bullet
from bullet_sglang import scheduler as bullet_scheduler
from bullet_sglang.scheduler import bullet_scheduler_class
from bullet_sglang.setup import build, resolve
from bullet_sglang.stream_groups import PREFILL_ALONE, choose_group, groups_left

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "graphs/h200/llama-3.1-8b.json"


def test_this_is_sglang_0_5_15():
    from bullet_sglang.version import check_sglang_version

    assert check_sglang_version() == "0.5.15"


# -- hook points: the live objects, not only their source --


_FIELD = object()  # a dataclass field without a default: declared, but no class attribute


def live(point):
    obj = importlib.import_module(point.path[: -len(".py")].replace("/", "."))
    for part in point.qualname.split("."):
        if not hasattr(obj, part) and dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)}:
            return _FIELD
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("point", HOOK_POINTS, ids=lambda p: f"{p.path.rsplit('/', 1)[-1]}:{p.qualname}")
def test_every_hook_point_is_live_with_the_parameters_we_rely_on(point):
    obj = live(point)
    if point.params is None:
        assert not inspect.isfunction(obj), f"{point.qualname} is a function now ({point.why})"
    else:
        assert tuple(inspect.signature(obj).parameters) == point.params, point.why


# -- argument parsing and validation --


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from bullet_kernels.models.presets import write_model_dir

    return Path(write_model_dir("llama-3.1-8b", tmp_path_factory.mktemp("models") / "llama-3.1-8b"))


LAUNCH = ["--enable-bullet", "--bullet-tpot-slo-ms", "15", "--bullet-ttft-slo-ms", "800", "--port", "30000",
          "--device", "cpu"]  # --device: SGLang looks for an accelerator otherwise (module docstring)


@pytest.fixture(scope="module")
def launch(model_dir):
    """(our options, the ServerArgs SGLang parses) for the launcher's argv."""
    opts, rest = split_argv(["--model-path", str(model_dir), *LAUNCH])
    check_supported(opts, rest)
    server_args = prepare_server_args(sglang_argv_for_bullet(rest))
    set_global_server_args_for_scheduler(server_args)  # as SGLang's scheduler process does
    return opts, rest, server_args


def test_the_launchers_argv_parses_into_real_server_args_with_the_settings_we_rely_on(launch, model_dir):
    opts, rest, server_args = launch
    assert opts == BulletOptions(enable=True, ttft_slo_ms=800.0, tpot_slo_ms=15.0)
    assert isinstance(server_args, ServerArgs) and server_args.model_path == str(model_dir)
    assert server_args.chunked_prefill_size == -1  # whole prompts, split by layers instead
    assert server_args.disable_overlap_schedule  # the split-prefill loop has no overlap thread
    assert not server_args.enable_pdmux  # our scheduler entry turns it on in the child only
    assert (server_args.tp_size, server_args.pp_size, server_args.dp_size) == (1, 1, 1)
    assert server_args.disaggregation_mode == "null" and server_args.speculative_algorithm is None
    server_args.check_server_args()  # what SGLang's launch checks, in the launcher's process


def checked_as_in_our_child(server_args):
    """SGLang's own check of ``server_args`` with what our scheduler entry sets in the child: pdmux
    on, one stream group per split and the whole GPU at each end."""
    server_args.enable_pdmux, server_args.sm_group_num = True, 6
    server_args.check_server_args()


def test_sglangs_pdmux_check_passes_our_argv_and_refuses_it_without_our_additions(model_dir):
    base = ["--model-path", str(model_dir), "--device", "cpu"]
    checked_as_in_our_child(prepare_server_args(sglang_argv_for_bullet(base)))
    plain = prepare_server_args(base)
    assert plain.chunked_prefill_size > 0 and not plain.disable_overlap_schedule
    with pytest.raises(AssertionError, match="chunked prefill|overlap schedule"):
        checked_as_in_our_child(plain)


def test_sglangs_parser_rejects_our_options_so_they_are_split_off_first(model_dir):
    with pytest.raises(SystemExit):
        prepare_server_args(["--model-path", str(model_dir), "--device", "cpu", "--enable-bullet"])


def sglang_options() -> set[str]:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return set(parser._option_string_actions)


def test_every_sglang_option_we_read_or_refuse_is_one_of_sglangs():
    import bullet_sglang.options as options
    import bullet_sglang.setup as setup

    ours = set(options._parser()._option_string_actions)  # every option of our launcher's own parser
    assert {"--enable-bullet", "--bullet-tpot-slo-ms", "--bullet-overlap"} <= ours
    source = inspect.getsource(options) + inspect.getsource(setup)
    named = set(re.findall(r"[\"'](--[a-z][a-z0-9-]*[a-z0-9])[\"'=]", source)) - ours
    missing = named - sglang_options()
    # "--tp" alone is not SGLang's (argparse takes it as an abbreviation of --tp-size)
    assert missing <= {"--tp"}, f"options we check that SGLang 0.5.15 does not have: {sorted(missing)}"
    assert {"--tp-size", "--chunked-prefill-size", "--disable-overlap-schedule", "--enable-pdmux",
            "--pdmux-config-path", "--model-path"} <= named


@pytest.mark.parametrize("flags,words", [
    (["--tp-size", "2"], "tensor parallel size 1"),
    (["--chunked-prefill-size", "2048"], "chunked prefill, which it replaces"),
    (["--enable-pdmux"], "give one of them"),
    (["--speculative-algorithm", "EAGLE"], "speculative decoding"),
])
def test_setups_we_refuse_are_ones_sglang_itself_accepts(model_dir, flags, words):
    """The refusals are ours (the bullet loop cannot run them), not SGLang's parser's."""
    base = ["--model-path", str(model_dir), "--device", "cpu"]
    opts, rest = split_argv([*base, "--enable-bullet", *flags])
    with pytest.raises(UnsupportedSetup, match=words):
        check_supported(opts, rest)
    if flags[0] != "--speculative-algorithm":  # SGLang needs a draft model for that one
        parser = argparse.ArgumentParser()
        ServerArgs.add_cli_args(parser)
        parser.parse_args(rest)


@pytest.mark.parametrize("flags,words", [
    (["--dp", "2"], "--dp-size 1 only"),
    (["--speculative-algo", "EAGLE"], "speculative decoding"),
    (["--disaggregation-m", "prefill"], "PD disaggregation"),
    (["--enable-pd"], "give one of them"),
    (["--chunked-prefill", "2048"], "chunked prefill, which it replaces"),
])
def test_abbreviated_options_pass_the_argv_check_and_are_refused_once_parsed(model_dir, flags, words):
    """SGLang's parser takes unambiguous abbreviations; the launcher refuses them on SGLang's parse
    of the arguments as given (options.parse_sglang_argv, check_parsed), before any GPU memory."""
    from bullet_sglang.options import check_parsed, parse_sglang_argv

    opts, rest = split_argv(["--model-path", str(model_dir), "--device", "cpu", "--enable-bullet", *flags])
    check_supported(opts, rest)  # the command line alone cannot tell
    with pytest.raises(UnsupportedSetup, match=words):
        check_parsed(parse_sglang_argv(rest))


def test_the_parsed_model_and_gpu_are_the_ones_the_launcher_plans_for(model_dir):
    from bullet_sglang.options import check_parsed, parse_sglang_argv

    raw = parse_sglang_argv(["--model-pa", str(model_dir), "--base-gpu", "1", "--device", "cpu"])
    check_parsed(raw)
    assert (raw.model_path, raw.base_gpu_id) == (str(model_dir), 1)


def test_the_launchers_own_argv_passes_the_parsed_check(launch):
    from bullet_sglang.options import check_parsed

    check_parsed(launch[2])


# -- the partition plan from the arguments --


@pytest.fixture(scope="module")
def setup(launch):
    opts, rest, _ = launch
    resolved = resolve(opts, rest, device="NVIDIA H200")
    assert Path(resolved.profile) == PROFILE
    return build(resolved)


def test_the_partition_plan_comes_from_the_arguments_and_the_profile(setup, launch):
    from bullet_kernels.orchestrate import Estimator, Profile, SLOPolicy

    _, _, server_args = launch
    estimator = Estimator(Profile.load(PROFILE))
    assert isinstance(setup.policy, SLOPolicy) and (setup.policy.tpot_ms, setup.policy.ttft_ms) == (15.0, 800.0)
    assert setup.plan.sm_count == estimator.sm_count == 132 and setup.policy_groups == len(estimator.groups)
    assert setup.plan.size == len(setup.plan.splits) + 2 == 6
    counts = setup.plan.sm_counts()
    assert counts[0] == (132, 0) and counts[-1] == (0, 132)  # SGLang's order: prefill alone ... decode alone
    assert all(p + d <= 132 and p > 0 and d > 0 for p, d in counts[1:-1])
    config = pdmux_context.PDMuxConfig(sm_group_num=setup.plan.size)  # what init_pdmux makes
    assert config.sm_group_num >= 3 and not config.manual_divisions  # load_pdmux_config's own rule
    # the model SGLang loads has the profile's shapes (groups_left divides its layers)
    hf_config = ModelConfig.from_server_args(server_args).hf_config.to_dict()
    assert Profile.load(PROFILE).check_matches(device_name="NVIDIA H200", model_config=hf_config, strict=False) == []


# -- the scheduler subclass, built from SGLang's real Scheduler --


@pytest.fixture
def pdmux_state(monkeypatch):
    """pdmux_context's module state, restored after the test."""
    for name in ("STREAM_GROUPS", "SM_COUNTS", "CURRENT_STREAM_IDX", "CURRENT_STREAM_GROUP"):
        monkeypatch.setattr(pdmux_context, name, getattr(pdmux_context, name))
    return pdmux_context


def groups_opener(opened):
    def open_groups(plan, gpu_id):  # the GPU part: one (prefill, decode) stream pair per group
        opened.append(gpu_id)
        return [(f"prefill-stream{i}", f"decode-stream{i}") for i in range(plan.size)]

    return open_groups


@pytest.fixture
def bullet_cls(setup, launch):
    return bullet_scheduler_class(sglang_scheduler.Scheduler, setup.plan, setup.policy, groups_opener([]),
                                  pdmux_context, policy_groups=setup.policy_groups)


def test_the_subclass_overrides_the_multiplex_mixin_and_reads_gpu_id_and_tp_size_from_ps(bullet_cls):
    Scheduler = sglang_scheduler.Scheduler
    assert issubclass(bullet_cls, Scheduler) and SchedulerMultiplexMixin in Scheduler.__mro__
    assert bullet_cls.__name__ == "BulletScheduler"
    for name in ("init_pdmux", "adjust_stream_groups", "set_internal_state"):
        theirs = getattr(Scheduler, name)
        if name != "set_internal_state":
            assert theirs is getattr(SchedulerMultiplexMixin, name)  # the mixin's, which we replace
        assert getattr(bullet_cls, name) is not theirs
        assert inspect.signature(getattr(bullet_cls, name)).parameters.keys() == inspect.signature(theirs).parameters.keys()
    # why the properties exist: pdmux reads self.gpu_id / self.tp_size, the Scheduler keeps them in ps only
    assert "self.gpu_id" in inspect.getsource(SchedulerMultiplexMixin.init_pdmux)
    assert "self.tp_size" in inspect.getsource(SchedulerMultiplexMixin.event_loop_pdmux)
    assert "self.gpu_id =" not in inspect.getsource(Scheduler) and "self.tp_size =" not in inspect.getsource(Scheduler)
    s = object.__new__(bullet_cls)
    s.ps = parallel_state(gpu_id=3)
    assert (s.gpu_id, s.tp_size) == (3, 1)
    s.gpu_id = 5  # a later SGLang that sets it itself keeps working
    assert s.gpu_id == 5 and s.ps.gpu_id == 3


def parallel_state(gpu_id):
    return ParallelState(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, dp_rank=None, dp_size=1, attn_tp_rank=0,
                         attn_tp_size=1, attn_cp_rank=0, attn_cp_size=1, attn_dp_rank=0, attn_dp_size=1,
                         moe_ep_rank=0, moe_ep_size=1, moe_dp_rank=None, moe_dp_size=1, gpu_id=gpu_id)


class Pools:
    """SGLang's own request and KV pools, allocator and chunk cache (radix cache off), on the CPU, tiny."""

    def __init__(self, model_config, tokens=1 << 19, reqs=256):
        self.model_config = model_config
        self.req_to_token = ReqToTokenPool(size=reqs, max_context_len=8192, device="cpu", enable_memory_saver=False)
        kv = MHATokenToKVPool(size=tokens, page_size=1, dtype=torch.bfloat16, head_num=1, head_dim=4, layer_num=1,
                              device="cpu", enable_memory_saver=False, enable_alt_stream=False)
        self.allocator = TokenToKVPoolAllocator(size=tokens, dtype=torch.bfloat16, device="cpu", kvcache=kv,
                                                need_sort=False)
        self.tree_cache = ChunkCache(CacheInitParams(disable=True, req_to_token_pool=self.req_to_token,
                                                     token_to_kv_pool_allocator=self.allocator, page_size=1))
        self.rid = 0

    def requests(self, prompt_lens):
        reqs = []
        for n in prompt_lens:
            params = SamplingParams(max_new_tokens=64)
            params.normalize(None)
            req = Req(f"r{self.rid}", "", array("q", [1] * n), params, vocab_size=self.model_config.vocab_size)
            self.rid += 1
            req.init_next_round_input(self.tree_cache)
            # what SGLang's PrefillAdder does for a prompt admitted whole (chunked prefill off)
            req.set_extend_range(len(req.prefix_indices), len(req.full_untruncated_fill_ids))
            reqs.append(req)
        return reqs

    def prefill(self, prompt_lens):
        """A prefill batch as get_new_batch_prefill builds it."""
        batch = ScheduleBatch.init_new(self.requests(prompt_lens), self.req_to_token, self.allocator,
                                       self.tree_cache, self.model_config, False, SpeculativeAlgorithm.NONE)
        batch.prepare_for_extend()
        return batch

    def split_prefill(self, prompt_lens, split_index=0):
        """The batch the pdmux loop splits by layers (update_split_prefill_batch), ``split_index`` layers in."""
        batch = self.prefill(prompt_lens)
        batch.forward_mode = ForwardMode.SPLIT_PREFILL
        batch.split_index = split_index
        return batch

    def running(self, prompt_lens, generated):
        """A decode batch: prefilled, ``generated`` tokens out per request, ready for its next step."""
        batch = self.prefill(prompt_lens)
        for req in batch.reqs:
            req.output_ids.extend([7] * generated)
        batch.prepare_for_decode()
        return batch


@pytest.fixture(scope="module")
def model_config(launch):
    return ModelConfig.from_server_args(launch[2])


def test_real_batches_carry_what_adjust_stream_groups_reads(model_config):
    pools = Pools(model_config)
    prefill = pools.split_prefill([700, 300], split_index=8)
    assert prefill.extend_num_tokens == 1000 and prefill.split_index == 8 and not prefill.is_empty()
    assert prefill.forward_mode.is_split_prefill()
    running = pools.running([900, 1200], generated=5)
    assert running.batch_size() == 2 and running.forward_mode.is_decode()
    assert [len(r.origin_input_ids) + len(r.output_ids) for r in running.reqs] == [r.seqlen for r in running.reqs] \
        == [905, 1205]
    assert ScheduleBatch(reqs=[], batch_is_full=False).is_empty()  # the Scheduler's idle running batch


def test_the_subclass_chooses_groups_with_our_policy_on_real_batches(setup, launch, model_config, pdmux_state):
    plan, policy, policy_groups = setup.plan, setup.policy, setup.policy_groups
    assert policy.ttft_ms == launch[0].ttft_slo_ms
    opened, switched = [], []
    cls = bullet_scheduler_class(sglang_scheduler.Scheduler, plan, policy, groups_opener(opened), pdmux_context,
                                 policy_groups=policy_groups)
    s = object.__new__(cls)  # SGLang's __init__ loads a model on a GPU; the attributes the loop reads instead:
    s.server_args, s.ps, s.model_config = launch[2], parallel_state(gpu_id=2), model_config
    s.tp_worker = SimpleNamespace(model_runner=SimpleNamespace(update_decode_attn_backend=switched.append))
    pools = Pools(model_config)
    s.running_batch = ScheduleBatch(reqs=[], batch_is_full=False)

    s.init_pdmux()
    groups = [(f"prefill-stream{i}", f"decode-stream{i}") for i in range(plan.size)]
    assert opened == [2]  # opened on the scheduler's GPU, read from ps
    assert pdmux_context.get_stream_groups() == pdmux_context.STREAM_GROUPS == s.stream_groups == groups
    assert pdmux_context.get_sm_counts() == s.sm_counts == plan.sm_counts() and s.real_sm_group_num == plan.size
    assert pdmux_context.get_current_stream_idx() == 0 and pdmux_context.CURRENT_STREAM_GROUP == groups[0]
    assert isinstance(s.pdmux_config, pdmux_context.PDMuxConfig) and s.pdmux_config.sm_group_num == plan.size
    assert s.split_prefill_batch is None

    layers = model_config.num_hidden_layers
    seen = set()
    for decode_lens, generated, prompt_lens, split_index in [
        ([1000] * 4, 3, [2048], 0), ([1500] * 64, 20, [1024, 1024], 0), ([3000] * 128, 50, [4096], 8),
        ([500] * 16, 1, [512], layers - 1), ([2000] * 32, 10, [8000], 24),
    ]:
        pools = Pools(model_config)  # room for this case's requests
        s.running_batch = pools.running(decode_lens, generated)
        s.split_prefill_batch = pools.split_prefill(prompt_lens, split_index)
        decode = (len(decode_lens), max(r.seqlen for r in s.running_batch.reqs))
        tokens, left = sum(prompt_lens), groups_left(split_index, layers, policy_groups)
        want = choose_group(plan, policy, decode, tokens, left, policy.ttft_ms)
        idx, group = s.adjust_stream_groups()
        assert (idx, group) == (want, groups[want]) and 0 < idx < plan.decode_alone
        assert pdmux_context.get_current_stream_idx() == idx and pdmux_context.CURRENT_STREAM_GROUP == groups[idx]
        assert switched[-1] == idx  # the decode attention backend follows the group
        # the layers the real loop runs this turn (event_loop_pdmux's forward_count, from the budget we set)
        budget, batch = s.pdmux_config.split_forward_token_budget, s.split_prefill_batch
        forward_count = max(1, budget // batch.extend_num_tokens)
        assert min(batch.split_index + forward_count, layers) - batch.split_index == \
            min(bullet_scheduler.PREFILL_LAYERS_PER_TURN or layers, layers - split_index)
        seen.add(idx)
    assert len(seen) >= 2, f"every case chose group {seen}: the cases do not exercise the policy"

    s.split_prefill_batch = None  # merged into the running batch: decode alone, the whole GPU
    assert s.adjust_stream_groups() == (plan.decode_alone, groups[plan.decode_alone])
    s.running_batch = ScheduleBatch(reqs=[], batch_is_full=False)  # decode ran dry
    s.split_prefill_batch = pools.split_prefill([256])
    assert s.adjust_stream_groups() == (PREFILL_ALONE, groups[0])
    s.split_prefill_batch = None
    assert s.adjust_stream_groups()[0] == PREFILL_ALONE and pdmux_context.get_current_stream_idx() == 0


def test_decode_steps_of_real_batches_feed_the_policys_estimator(setup, launch, model_config, pdmux_state,
                                                                 monkeypatch):
    """Step feedback (on by default) inside the real Scheduler: our run_batch takes SGLang's
    arguments, hands every batch to SGLang's own, and times only the running (decode) batch."""
    from bullet_kernels.orchestrate import FeedbackEstimator

    assert isinstance(setup.policy.estimator, FeedbackEstimator) and setup.feedback is setup.policy.estimator.feedback
    theirs = inspect.signature(sglang_scheduler.Scheduler.run_batch).parameters
    assert list(theirs) == ["self", "batch", "pp_proxy_tensors"]
    ran = []
    monkeypatch.setattr(sglang_scheduler.Scheduler, "run_batch",
                        lambda self, batch, pp_proxy_tensors=None: ran.append((batch, pp_proxy_tensors)) or "result")
    now = [0.0]
    cls = bullet_scheduler_class(sglang_scheduler.Scheduler, setup.plan, setup.policy, groups_opener([]),
                                 pdmux_context, policy_groups=setup.policy_groups, feedback=setup.feedback,
                                 clock=lambda: now[0])
    s = object.__new__(cls)
    s.server_args, s.ps, s.model_config = launch[2], parallel_state(gpu_id=0), model_config
    s.tp_worker = SimpleNamespace(model_runner=SimpleNamespace(update_decode_attn_backend=lambda idx: None))
    s.running_batch = ScheduleBatch(reqs=[], batch_is_full=False)
    s.init_pdmux()
    pools = Pools(model_config)
    s.running_batch, s.split_prefill_batch = pools.running([1000] * 16, generated=3), None
    assert s.adjust_stream_groups()[0] == setup.plan.decode_alone
    prefill = pools.split_prefill([512])
    for _ in range(12):
        assert s.run_batch(s.running_batch) == "result" and s.run_batch(prefill, pp_proxy_tensors=None) == "result"
        now[0] += 0.010
    assert len(ran) == 24 and ran[1] == (prefill, None)
    profiled = setup.policy.estimator.profiled_decode_ms(16, 1024, 132).ms  # context 1003, rounded like the policy
    assert setup.feedback.summary() == {132: {"samples": 11, "offset_ms": round(10.0 - profiled, 3)}}


def test_what_the_overlapped_loop_relies_on_holds_in_real_sglang(model_config):
    """overlap.py's assumptions, on SGLang's own code and objects: the result processor is a
    dataclass whose enable_overlap turns on the skip of requests finished while their next step
    ran; the copy stream exists without overlap; a running batch marked enable_overlap prepares the
    next step in new tensors, so the snapshot of the step in flight keeps its sequence lengths."""
    from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor

    assert dataclasses.is_dataclass(SchedulerBatchResultProcessor)
    assert "enable_overlap" in {f.name for f in dataclasses.fields(SchedulerBatchResultProcessor)}
    decode = inspect.getsource(SchedulerBatchResultProcessor.process_batch_result_decode)
    assert decode.index("copy_done.synchronize()") < decode.index("self.enable_overlap")
    assert re.search(r"self\.enable_overlap.*\n.*req\.finished\(\) or req\.is_retracted", decode)
    # a landed prefill's result is copied on its lane with copy_done (which copy_to_cpu records on
    # the current stream), so processing it on the decode lane waits for that event, not the lane
    prefill = inspect.getsource(SchedulerBatchResultProcessor.process_batch_result_prefill)
    assert re.search(r"if result\.copy_done is not None:\s*\n\s*result\.copy_done\.synchronize\(\)", prefill)
    assert prefill.index("copy_done.synchronize()") < prefill.index("next_token_ids.tolist()")
    from sglang.srt.managers.utils import GenerationBatchResult
    assert "self.copy_done.record()" in inspect.getsource(GenerationBatchResult.copy_to_cpu)
    builds = inspect.getsource(sglang_scheduler.Scheduler.init_batch_result_processor)
    assert "self.batch_result_processor = SchedulerBatchResultProcessor(" in builds  # what our override replaces
    init = inspect.getsource(sglang_scheduler.Scheduler.init_overlap)
    assert init.index("self.copy_stream_ctx") < init.index("if not self.enable_overlap")
    pools = Pools(model_config)
    running = pools.running([900, 1200], generated=5)
    from bullet_sglang.overlap import overlappable
    assert overlappable(running)  # greedy, no grammar, no penalties: what overlap.py decides from
    decode_source = inspect.getsource(ScheduleBatch.prepare_for_decode)
    assert "penalizer_orchestrator.is_required" in decode_source and "cumulate_penalty_output_tokens" in decode_source
    running.enable_overlap = True
    launched = running.copy()
    before = launched.seq_lens_cpu.tolist()
    running.prepare_for_decode()  # step k+1 prepared while step k is unprocessed
    assert launched.seq_lens_cpu.tolist() == before and running.seq_lens_cpu.tolist() == [b + 1 for b in before]
    assert launched.reqs == running.reqs and launched.reqs is not running.reqs


def test_a_prefills_last_run_waits_on_the_host_only_for_input_top_k_or_token_id_logprobs(model_config):
    """overlap.syncs_on_last_layers on real batches, and the SGLang code that makes it true: the
    logits processor asks for input top-k / token-id logprobs from the batch's lists and reads
    them to the host (``.tolist()``) in the same forward."""
    from sglang.srt.layers import logits_processor

    from bullet_sglang.overlap import syncs_on_last_layers

    source = inspect.getsource(logits_processor)
    assert "x > 0 for x in forward_batch.top_logprobs_nums" in source
    assert "x is not None for x in forward_batch.token_ids_logprobs" in source
    assert re.search(r"def get_top_logprobs_prefill[\s\S]*?\.tolist\(\)", inspect.getsource(
        sys.modules[logits_processor.get_top_logprobs_prefill.__module__]))
    pools = Pools(model_config)
    batch = pools.split_prefill([300, 500])
    assert not syncs_on_last_layers(batch)
    batch.return_logprob, batch.top_logprobs_nums, batch.token_ids_logprobs = True, [0, 0], [None, None]
    assert not syncs_on_last_layers(batch)  # logprobs of the sampled tokens only: read from the copy
    batch.top_logprobs_nums = [0, 5]
    assert syncs_on_last_layers(batch)
    batch.top_logprobs_nums, batch.token_ids_logprobs = [0, 0], [None, [11, 12]]
    assert syncs_on_last_layers(batch)


def test_the_overlap_option_runs_our_loop_with_sglangs_pdmux_flag(setup, monkeypatch):
    ran = []
    monkeypatch.setattr(bullet_scheduler, "overlapped_loop",
                        lambda s, lanes: ran.append((s, lanes.set_pdmux_status, torch.is_inference_mode_enabled())))
    make = lambda overlap: bullet_scheduler_class(  # noqa: E731
        sglang_scheduler.Scheduler, setup.plan, setup.policy, groups_opener([]), pdmux_context,
        policy_groups=setup.policy_groups, overlap=overlap)
    s = object.__new__(make(True))
    s.event_loop_pdmux()
    from sglang.srt.distributed.parallel_state import set_pdmux_status
    assert ran == [(s, set_pdmux_status, True)]  # under inference mode, as pdmux's own loop runs
    monkeypatch.setattr(SchedulerMultiplexMixin, "event_loop_pdmux", lambda self: ran.append("pdmux's"))
    object.__new__(make(False)).event_loop_pdmux()  # off: SGLang's own loop
    assert ran[1:] == ["pdmux's"]


def test_set_internal_state_takes_real_requests_and_answers_with_sglangs_output(launch, model_config):
    """Our /set_internal_state override with SGLang's request and output types; anything not ours
    goes to SGLang's own method (here refused by it: not a setting it lets change)."""
    from sglang.srt.managers.io_struct import SetInternalStateReq, SetInternalStateReqOutput

    opts, rest, _ = launch
    own = build(resolve(opts, rest, device="NVIDIA H200"))  # its policy is changed here
    cls = bullet_scheduler_class(sglang_scheduler.Scheduler, own.plan, own.policy, groups_opener([]), pdmux_context,
                                 policy_groups=own.policy_groups)
    s = object.__new__(cls)
    s.ps, s.model_config = parallel_state(gpu_id=0), model_config
    done = s.set_internal_state(SetInternalStateReq(server_args={"bullet_tpot_slo_ms": 12}))
    assert isinstance(done, SetInternalStateReqOutput) and done.updated
    assert done.server_args == {"bullet_tpot_slo_ms": 12.0, "bullet_tpot_mode": "step"} and own.policy.tpot_ms == 12.0
    mode = s.set_internal_state(SetInternalStateReq(server_args={"bullet_tpot_mode": "average"}))
    assert mode.updated and own.policy.tpot_mode == "average"
    ttft = s.set_internal_state(SetInternalStateReq(server_args={"bullet_ttft_slo_ms": 600}))
    assert not ttft.updated and own.policy.ttft_ms == opts.ttft_slo_ms  # not offered: it steers nothing here
    mixed = s.set_internal_state(SetInternalStateReq(server_args={"bullet_tpot_slo_ms": 9, "log_level": "debug"}))
    assert not mixed.updated and own.policy.tpot_ms == 12.0
    theirs = s.set_internal_state(SetInternalStateReq(server_args={"log_level": "debug"}))
    assert isinstance(theirs, SetInternalStateReqOutput) and not theirs.updated
    assert theirs.server_args["model_path"] == launch[2].model_path  # SGLang's own answer: its server args


def test_lane_targeted_decode_graphs_reach_sglangs_capture_and_gemms():
    """--bullet-decode-linear cublaslt-target relies on: the model runner importing
    DecodeCudaGraphRunner from its module when it captures (so installing our subclass there is
    what it builds), the pdmux capture calling _capture_one_stream once per stream group with the
    group's index, and the unquantized linear method's default bf16 path being F.linear (torch's
    matmul, which the cuBLASLt target reaches)."""
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
    from sglang.srt.model_executor.model_runner import ModelRunner
    from sglang.srt.model_executor.runner import decode_cuda_graph_runner

    from bullet_sglang import graph_runner

    init = inspect.getsource(ModelRunner.init_decode_cuda_graph)
    assert re.search(r"from sglang\.srt\.model_executor\.runner\.decode_cuda_graph_runner import \(?\s*"
                     r"DecodeCudaGraphRunner", init)
    capture = inspect.getsource(decode_cuda_graph_runner.DecodeCudaGraphRunner.capture)
    assert re.search(r"for i, sg in enumerate\(self\.stream_groups\):[\s\S]*?self\._capture_one_stream\(i\)", capture)
    assert inspect.getsource(UnquantizedLinearMethod.apply).rstrip().endswith("return F.linear(x, layer.weight, bias)")
    original = decode_cuda_graph_runner.DecodeCudaGraphRunner
    try:
        cls = graph_runner.install(decode_cuda_graph_runner, [0, 32, 48, 132], 132)
        assert issubclass(cls, original) and decode_cuda_graph_runner.DecodeCudaGraphRunner is cls
    finally:
        decode_cuda_graph_runner.DecodeCudaGraphRunner = original
