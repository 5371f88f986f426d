"""Assemble a server: model (preset with random weights, or a Hugging Face directory), runner,
scheduler, engine thread, tokenizer and routes.

    service = build_service("tiny-llama3", mode="chunked", device="cpu")
    runner = await server.start(service, port=0)      # or server.run(service, host, port)

``bullet serve`` is this plus option parsing. On a GPU in ``bullet`` mode the lanes come from
the SLO policy over the shipped profile's candidate splits (``graphs/<gpu>/<model>.json``); a
missing profile is an error naming ``bullet profile``. Elsewhere every step runs on the whole
device (and without a GPU, eagerly).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import EngineConfig
from ..engine import ModelRunner, Placement
from ..engine.placement import WHOLE_GPU
from .engine import ServingEngine
from .request import DEFAULT_CHUNK_SIZE, PREFILL_AHEAD
from .scheduler import Scheduler, SchedulerConfig, whole_gpu
from .server import Service
from .tokenizer import TextTokenizer

GPU_DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GPU_PREFILL_BUCKETS = (256, 512, 1024, 2048, 4096, 8192)


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    model: str = "tiny-llama3"
    mode: str = "bullet"
    device: str | None = None  # default: cuda if available
    max_context: int | None = None
    kv_pages: int | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_running: int = 128
    max_waiting: int = 1024
    max_prefill_tokens: int = 8192  # bullet and sequential: prompt tokens in one prefill
    ttft_slo_ms: float = 1000.0
    tpot_slo_ms: float = 20.0
    split: str | None = None  # bullet mode: this split whenever both lanes have work (no profile needed)
    overlap: bool = True  # overlap host work with the decode step in flight (SchedulerConfig.overlap)
    fuse_prompt_tokens: int = 0  # bullet mode: prompts this short fused into decode steps (SchedulerConfig)
    prefill_ahead: int = PREFILL_AHEAD  # bullet mode: layer groups queued on the prefill lane (SchedulerConfig)
    backend: str | None = None  # bullet mode: the lanes' partition backend (None: BULLET_BACKEND, else green)
    seed: int = 0


def load_model(opts: ServeOptions, device: torch.device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = Path(opts.model)
    if path.is_dir():
        from ..models.weights import load_model as load_weights

        return load_weights(path, dtype=dtype, device=device, max_context=opts.max_context), path.name
    from ..models.presets import random_model

    return random_model(opts.model, seed=opts.seed, dtype=dtype, device=device, max_context=opts.max_context), opts.model


def policy_placements(model_name: str, model_config, opts: ServeOptions):
    """The SLO policy's lanes for each bullet step (GPU): both lanes of its split, or the whole
    GPU for a phase alone; with the profile's layer groups and candidate splits. The profile
    must be of this GPU and model (refused otherwise, naming both)."""
    from ..orchestrate import Profile, find_profile
    from ..results import gpu_slug

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    profile = Profile.load(find_profile(gpu_slug(props.name), model_name))
    profile.check_matches(device_name=props.name, sm_count=props.multi_processor_count, model_config=model_config)
    return placements_from_profile(profile, opts)


def placements_from_profile(profile, opts: ServeOptions):
    """:func:`policy_placements` for a loaded profile (no GPU needed): ``(placements, the
    candidate splits, the profile's layer groups)``."""
    from ..orchestrate import Estimator, SLOPolicy
    from ..orchestrate.policy import split_chooser
    from ..orchestrate.profiler import DEFAULT_SPLITS

    estimator = Estimator(profile)
    policy = SLOPolicy(estimator, list(DEFAULT_SPLITS), tpot_ms=opts.tpot_slo_ms, ttft_ms=opts.ttft_slo_ms)
    # The TTFT target is watched, not enforced: the policy's decision marks a prefill whose
    # estimate misses it; the split is chosen by the TPOT target.
    choose = split_chooser(policy, ttft_left_ms=opts.ttft_slo_ms)

    def placements(decode, prefill):
        batch, context = decode if decode else (0, 0)
        tokens, groups = prefill if prefill else (None, 0)
        split = choose(batch, context, tokens, groups)
        if split is None:
            return WHOLE_GPU, WHOLE_GPU
        return Placement(split, "decode"), Placement(split, "prefill")

    placements.cache_info = choose.cache_info

    return placements, tuple(DEFAULT_SPLITS), len(estimator.groups)


def static_placements(split_text: str):
    """One split for both lanes whenever both have work; the whole GPU for a phase alone.
    ``(placements, (split,), None)``: no profile, so the engine's own layer groups."""
    from ..orchestrate.policy import check_splits

    (split,) = check_splits([split_text])

    def placements(decode, prefill):
        if decode is None or prefill is None:
            return WHOLE_GPU, WHOLE_GPU
        return Placement(split, "decode"), Placement(split, "prefill")

    return placements, (split,), None


def capture_all(runner: ModelRunner, splits) -> None:
    """Capture every graph the scheduler can ask for before serving: a capture during serving
    stalls every request in flight (the first smoke run's TTFT tail was exactly that). Lazy
    capture stays on for anything missed."""
    placements = [(WHOLE_GPU, ("decode", "prefill"))]
    for split in splits:
        placements += [(Placement(split, "decode"), ("decode",)), (Placement(split, "prefill"), ("prefill",))]
    for placement, phases in placements:
        runner.capture(placement, phases=phases, progress=True)


def build_service(opts: ServeOptions) -> Service:
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, name = load_model(opts, device)
    sched_cfg = SchedulerConfig(mode=opts.mode, chunk_size=opts.chunk_size, max_running=opts.max_running,
                                max_waiting=opts.max_waiting, max_prefill_tokens=opts.max_prefill_tokens,
                                eos_token_ids=tuple(model.config.eos_token_ids),
                                overlap=opts.overlap, fuse_prompt_tokens=opts.fuse_prompt_tokens,
                                prefill_ahead=opts.prefill_ahead)
    placements, splits, groups = whole_gpu, (), None
    if device.type == "cuda" and opts.mode == "bullet" and opts.split:
        placements, splits, groups = static_placements(opts.split)
    elif device.type == "cuda" and opts.mode == "bullet":
        placements, splits, groups = policy_placements(name, model.config, opts)
    gpu = device.type == "cuda"
    cfg = EngineConfig.from_env(
        kv_num_pages=opts.kv_pages, max_context=opts.max_context, lazy_capture=gpu, splits=splits,
        prefill_max_seqs=opts.max_running + 1,
        **({"backend": opts.backend} if opts.backend else {}),
        **({"layer_groups": groups} if groups else {}),  # the profile's groups: the policy counts in them
        **({"decode_buckets": GPU_DECODE_BUCKETS, "prefill_buckets": GPU_PREFILL_BUCKETS} if gpu else {}),
    )
    runner = ModelRunner(model, cfg)
    if gpu:
        capture_all(runner, splits)
    scheduler = Scheduler(runner, sched_cfg, placements)
    tokenizer = TextTokenizer.for_model(opts.model, model.config.vocab_size)
    return Service(ServingEngine(scheduler).start(), tokenizer, name, opts.mode)
