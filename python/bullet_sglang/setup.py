"""What ``--enable-bullet`` resolves before SGLang starts (no CUDA context), and rebuilds in
SGLang's scheduler process: the latency profile that plans the splits, and the policy.

The policy estimates decode and prefill times from a bullet_kernels latency profile of this GPU
and model (``graphs/<gpu>/<model>.json``, made by ``bullet profile``). Those times were measured
with our own kernels and graphs, not SGLang's: they order the candidate splits, and are an
approximation of SGLang's absolute step times (docs/sglang-adapter.md).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from .options import BulletOptions, UnsupportedSetup, value_of
from .stream_groups import GroupPlan, candidate_splits


def model_config(sglang_argv: Sequence[str]) -> tuple[str, dict]:
    """``(model path, its config.json)`` from ``--model-path`` (a local directory: the adapter
    reads the model's shapes before SGLang starts)."""
    path = value_of(sglang_argv, "--model-path", "--model")
    if path is None:
        raise UnsupportedSetup("--enable-bullet needs --model-path (a local model directory with config.json)")
    config = Path(path) / "config.json"
    if not config.is_file():
        raise UnsupportedSetup(f"--enable-bullet reads the model's shapes from {config}, which does not exist; "
                               "give --model-path a local model directory")
    return path, json.loads(config.read_text())


def gpu_name(index: int = 0) -> str:
    """The name of GPU ``index`` through NVML (no CUDA context, no GPU memory)."""
    from bullet_kernels.measure import nvml_device

    nvml, handle = nvml_device(index)
    if nvml is None:
        raise UnsupportedSetup(f"--enable-bullet needs the GPU's name before SGLang starts: {handle}")
    name = nvml.nvmlDeviceGetName(handle)
    return name.decode() if isinstance(name, bytes) else name


def find_matching_profile(device: str, config: dict, root: str | Path | None = None) -> Path:
    """The shipped profile of this GPU whose model has these shapes, or UnsupportedSetup naming
    what was looked at and how to make one."""
    from bullet_kernels.orchestrate import Profile
    from bullet_kernels.orchestrate.profile import graphs_dir
    from bullet_kernels.results import gpu_slug

    folder = Path(root if root is not None else graphs_dir()) / gpu_slug(device)
    tried = []
    for path in sorted(folder.glob("*.json")):
        profile = Profile.load(path)
        if not profile.check_matches(device_name=device, model_config=config, strict=False):
            return path
        tried.append(path.stem)
    raise UnsupportedSetup(
        f"no bullet_kernels latency profile matches this GPU ({device}) and model "
        f"({config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}); looked at "
        f"{', '.join(tried) or 'nothing'} in {folder}. Measure one with `bullet profile --model <preset or "
        "HF directory>` on this GPU"
    )


def check_partition(name: str, gpu_index: int = 0, device=None) -> None:
    """Refuse, before SGLang starts, a partition backend this GPU cannot run, and the tpc
    library's launch hook, whose lanes hold only inside our own launch scope (SGLang launches
    outside it, so they would run on the whole GPU). ``device`` (a ``DeviceInfo``, or None for
    no GPU) replaces the driver query in tests; the query takes no GPU memory (no context)."""
    from bullet_kernels.device import describe_state
    from bullet_kernels.partition import available_backends, backend_class

    why = ""
    if device is None:
        device, why = describe_state(gpu_index)
    reason = backend_class(name).unavailable_reason(device)
    if reason:
        usable = [b for b, r in available_backends(device).items() if not r and b != "none"]
        raise UnsupportedSetup(f"--bullet-partition {name} cannot run on GPU {gpu_index}: {reason}"
                               + (f" ({why})" if why and why not in reason else "")
                               + f"; usable here: {', '.join(usable) or 'none'}")
    if name == "tpc":
        from bullet_kernels.partition.tpc import mechanisms, native

        choice = mechanisms.choose(native.load(), device.driver_api_version)
        if choice.mechanism != "record":
            raise UnsupportedSetup(
                f"--bullet-partition tpc needs the driver's per-stream mask record; on driver API "
                f"{device.driver_api_version} it gets the {choice.mechanism} mechanism ({choice.why or 'as asked'}), whose "
                "lanes hold only inside bullet_kernels' launch scope, which SGLang does not enter; use "
                "--bullet-partition green")


# Models whose SGLang implementation has the split-prefill forward, restricted to the Llama family:
# Qwen3-family models fork a stream of their own during graph capture, which nothing confines to
# a lane yet (docs/sglang-adapter.md).
ARCHITECTURES = ("LlamaForCausalLM",)


def resolve(opts: BulletOptions, sglang_argv: Sequence[str], device: str | None = None,
            root: str | Path | None = None) -> BulletOptions:
    """``opts`` with the profile to plan with filled in."""
    _, config = model_config(sglang_argv)
    arch = config.get("architectures") or []
    if not set(arch) & set(ARCHITECTURES):
        raise UnsupportedSetup(f"--enable-bullet runs {', '.join(ARCHITECTURES)} models for now; this model is "
                               f"{', '.join(arch) or 'of no stated architecture'}")
    base_gpu = value_of(sglang_argv, "--base-gpu-id")  # the GPU SGLang will run on (tp 1)
    profile = find_matching_profile(device or gpu_name(int(base_gpu or 0)), config, root)
    return dataclasses.replace(opts, profile=str(profile))


@dataclasses.dataclass(frozen=True)
class Setup:
    plan: GroupPlan
    policy: object
    policy_groups: int
    feedback: object = None  # the StepFeedback correcting the policy's decode steps, or None (off)


def build(opts: BulletOptions) -> Setup:
    """The stream-group plan and SLO policy from the resolved options (scheduler process)."""
    from bullet_kernels.orchestrate import Estimator, FeedbackEstimator, Profile, SLOPolicy, Work
    from bullet_kernels.orchestrate.profiler import DEFAULT_SPLITS

    if not opts.profile:
        raise UnsupportedSetup("the bullet options were not resolved by the launcher (no latency profile)")
    profile = Profile.load(opts.profile)
    estimator = FeedbackEstimator(profile) if opts.step_feedback else Estimator(profile)
    splits = candidate_splits(DEFAULT_SPLITS)
    policy = SLOPolicy(estimator, list(splits), tpot_ms=opts.tpot_slo_ms, ttft_ms=opts.ttft_slo_ms,
                       tpot_mode=opts.tpot_mode)
    if not estimator.groups:
        raise UnsupportedSetup(f"the latency profile {opts.profile} has no prefill layer groups; remeasure it with "
                               "`bullet profile`")
    try:  # a profile the policy cannot plan with fails here, at start, not at the first co-located step
        policy.decide(Work(decode=(16, 1024), prefill_tokens=1024, prefill_groups_left=len(estimator.groups)))
    except Exception as exc:
        raise UnsupportedSetup(f"the SLO policy cannot plan with the latency profile {opts.profile}: "
                               f"{type(exc).__name__}: {exc}") from exc
    return Setup(GroupPlan(splits, estimator.sm_count), policy, len(estimator.groups),
                 estimator.feedback if opts.step_feedback else None)
