"""bullet: run LLM prefill and decode at the same time on one GPU, each on its own share of the SMs.

commands:
  bullet info    this machine: GPU, driver, green-context support, the partition backends and
                 how each restricts kernels, and partitions opened and verified on the GPU by a
                 probe kernel that records which SM each of its blocks ran on
  bullet bench   the main job: prefill beside decode (mixes A and B of the embedded llama-3.1-8b
                 preset, random weights), sequential, chunked prefill, static splits and the
                 orchestrator, in one run. Without a GPU it prints the device report and runs
                 the same schedules through the latency estimator on the shipped H200 profile,
                 labelled a simulation, and exits 0.
  bullet profile measure the latency profile (graphs/<gpu>/<model>.json) the orchestrator and
                 its estimator plan with (needs a GPU)
  bullet serve   an HTTP server (SGLang /generate, OpenAI completions and chat, streaming)
                 in bullet, chunked or sequential mode
  bullet bench-serving
                 Poisson load against a server: TTFT, TPOT, ITL percentiles and goodput
  bullet sweep   prefill throughput and decode step latency of a preset against the number of
                 SMs of its partition; JSON and PNG into --out (needs a GPU)

Arguments are checked before anything touches the GPU: a bad value exits with status 2 and says
what is allowed. Exit status: 0 done, 1 could not run (e.g. `bullet sweep` without a GPU),
2 bad arguments or a request the GPU or driver refused.

examples:
  bullet info --split prefill=96,decode=36 --json info.json
  bullet bench
  bullet sweep --quick --backend tpc --out results/h200
  bullet <command> --help        every option of a command, with its default
"""

from __future__ import annotations

import argparse
import collections.abc
import functools
import json
import os
import sys
import warnings
from pathlib import Path

from . import __version__
from .device import describe_state
from .errors import BulletError, InvalidSplitError
from .orchestrate.profile import SIMULATION_GPU  # without a GPU, `bullet bench` simulates on its profiles
from .partition import BACKENDS, DEFAULT_BACKEND, SMSplit

DEFAULT_INFO_SPLITS = ("prefill=96,decode=36", "prefill=104,decode=28", "decode=16")
DEFAULT_PRESET = "llama-3.1-8b"
DEFAULT_OUT = "bench/results"


# -- argument types: each refuses a bad value with what is allowed (argparse exits 2) ------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: give a whole number of at least 1")
    return value


def device_index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a GPU index: give 0, 1, ...")
    return value


def split_arg(text: str) -> SMSplit:
    try:
        return SMSplit.parse(text)
    except InvalidSplitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def json_file_arg(text: str) -> Path:
    """A file to write. Its folder must exist: a typo in a path should not create folders."""
    path = Path(text)
    folder = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name, e.g. {path / 'info.json'}")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(
            f"cannot write {text}: folder {folder} does not exist (create it first, or write elsewhere)"
        )
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: folder {folder} is not writable")
    return path


def out_dir_arg(text: str) -> str:
    """A results folder. Created when results are written (with parents), so it may be new,
    but it must be creatable: checked now, not after minutes of GPU work."""
    path = Path(text)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot use {text} as the results folder: {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot create or write {text}: {existing} is not writable")
    return text


class PresetNames(collections.abc.Sequence):
    """The model presets, looked up on first use: models import torch, which `bullet info` and
    `bullet --help` do not need (argparse reads choices only to check a given value or show help)."""

    def _names(self) -> list[str]:
        from .models.presets import PRESETS

        return list(PRESETS)

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written (line breaks kept); every option's help ends with its default.
    Options without a default value use ``default=argparse.SUPPRESS`` and say in their help
    what happens when they are left out."""


# -- bullet info -------------------------------------------------------------------------------------


def _native_state() -> str:
    from .partition.tpc import native

    reason = native.unavailable_reason()
    return f"missing: {reason}" if reason else f"loaded ({native.load().path})"


def _mechanism(name: str, device_index: int) -> str:
    """What the backend says about how it restricts lanes; "" where it says nothing."""
    from .partition import get_backend

    try:
        backend = get_backend(name, device_index)
        return getattr(backend, "describe", lambda: "")() or ""
    except BulletError as exc:
        return f"(cannot describe: {exc})"


def device_report(index: int) -> tuple:
    """Print GPU, native library and backends (with their mechanism); return (device, report)."""
    from .partition import available_backends

    device, reason = describe_state(index)
    report: dict = {"bullet_kernels": __version__, "native_tpc_library": _native_state()}
    print(f"bullet_kernels {__version__}")
    print(f"native TPC-mask library: {report['native_tpc_library']}")
    if device is None:
        report["device"] = None
        report["no_gpu_reason"] = reason
        print(f"GPU: none ({reason})")
    else:
        report["device"] = device.as_dict()
        cc = ".".join(map(str, device.compute_capability))
        print(
            f"GPU {device.index}: {device.name} ({device.uuid}), {device.sm_count} SMs / {device.tpc_count} TPCs, "
            f"cc {cc}, CUDA driver API {device.driver_api_version_str} (kernel driver {device.kernel_driver or '?'}), "
            f"{device.total_memory_bytes / 2**30:.1f} GiB, L2 {device.l2_bytes / 2**20:.0f} MiB"
        )
        if device.green_contexts:
            print(
                f"green contexts: yes (min partition {device.min_partition_sms} SMs, "
                f"alignment {device.partition_alignment_sms})"
            )
        else:
            print(f"green contexts: no ({device.green_unavailable_reason})")
    backends = available_backends(device)
    report["backends"] = backends
    report["mechanisms"] = {}
    print("backends:")
    for name, why in backends.items():
        if why:
            print(f"  {name:6s} unavailable: {why}")
            continue
        mechanism = report["mechanisms"][name] = _mechanism(name, index)
        print(f"  {name:6s} available" + (f": {mechanism}" if mechanism else ""))
    return device, report


def _verified_partitions(device, backends: dict, splits: list[SMSplit]) -> list[dict]:
    from .partition import Partitioner

    rows_out = []
    print("verified partitions (asked / granted / observed SMs by the %smid probe):")
    print(f"  {'backend':7s} {'split':28s} {'lane':8s} {'asked':>5s} {'granted':>7s} {'observed':>8s}  SM ids")
    for name in [b for b, why in backends.items() if not why and b != "none"]:
        for split in splits:
            try:
                # green runs before tpc (BACKENDS order): tpc's launch hook, once installed,
                # stops green contexts from being created, which is expected here, not news.
                with warnings.catch_warnings(), Partitioner(name, device.index) as parts:
                    warnings.filterwarnings("ignore", message=".*tpc launch hook.*")
                    rows = parts.get(split).table()
            except BulletError as exc:
                print(f"  {name:7s} {split.key:28s} refused: {exc}")
                rows_out.append({"backend": name, "split": split.key, "error": str(exc)})
                continue
            for row in rows:
                print(
                    f"  {name:7s} {split.key:28s} {row['lane']:8s} {row['asked']:5d} {row['granted']:7d} "
                    f"{row['observed']:8d}  {row['sm_ids']}"
                )
                rows_out.append({"backend": name, "split": split.key, **row})
    return rows_out


def info(args: argparse.Namespace) -> int:
    device, report = device_report(args.device)
    report["partitions"] = []
    if device is not None and not args.no_verify:
        splits = getattr(args, "split", None) or [SMSplit.parse(s) for s in DEFAULT_INFO_SPLITS]
        report["partitions"] = _verified_partitions(device, report["backends"], splits)
    path = getattr(args, "json", None)
    if path is not None:
        try:
            path.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            print(f"bullet info: error: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"report: {path}")
    return 0


# -- bullet sweep and bullet bench -----------------------------------------------------------------


def sweep(args: argparse.Namespace) -> int:
    from .sweep import main as sweep_main

    return sweep_main(args)


def _check_sweep_shapes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-argument checks against the preset (argparse checks each value alone)."""
    from .models.presets import preset_config

    config = preset_config(args.preset)
    if args.groups > config.num_layers:
        parser.error(
            f"--groups {args.groups}: {args.preset} has {config.num_layers} layers; give at most that many groups"
        )
    longest = max(args.prompt, args.context + 1)
    if longest > config.max_position_embeddings:
        parser.error(
            f"--prompt/--context ask for {longest} positions; {args.preset} allows {config.max_position_embeddings}"
        )


def _bench_plan(args: argparse.Namespace):
    from .colocation import SWEEP_MIXES, BenchPlan

    try:
        splits = {"splits": tuple(args.split)} if args.split else {}
        mixes = tuple(args.mix) + (SWEEP_MIXES if args.sweep else ())
        return BenchPlan(preset=args.preset, mixes=mixes, reps=args.reps, backend=args.backend,
                         tpot_factor=args.tpot_factor, chunks=tuple(args.chunk), **splits)
    except ValueError as exc:
        args.bench_parser.error(str(exc))


def _estimator(path: Path, device, preset: str):
    """The estimator on ``path``'s profile, checked against this GPU (when there is one) and the
    preset; a profile of another GPU or model is refused with what to do instead."""
    from .models.presets import preset_config
    from .orchestrate.estimator import Estimator
    from .orchestrate.profile import Profile

    profile = Profile.load(path)
    profile.check_matches(device_name=device.name if device else None, sm_count=device.sm_count if device else None,
                          model_config=preset_config(preset))
    return Estimator(profile)


def bench(args: argparse.Namespace) -> int:
    from . import colocation
    from .orchestrate.profile import MissingProfile, find_profile

    plan = _bench_plan(args)
    device, _ = describe_state()
    simulated = device is None or args.simulate
    if device is None:
        device_report(0)
        print()
    gpu = SIMULATION_GPU if simulated else _gpu_slug(device.name)
    try:
        path = Path(args.profile) if getattr(args, "profile", None) else find_profile(gpu, plan.preset)
    except MissingProfile as exc:
        if simulated:
            raise
        print(f"bullet bench: {exc}\nbullet bench: measuring the quick profile first "
              f"(`bullet profile --model {plan.preset} --quick`)", flush=True)
        path = _run_profiler(plan.preset, plan.backend, quick=True, out=None)
    if simulated:
        print(f"bullet bench: SIMULATION. {'No GPU here' if device is None else '--simulate given'}: the "
              f"co-location schedules run through the latency estimator on the profile {path} "
              f"(measured on an {gpu.upper()}), not on a GPU. Chunked prefill and kernel-level "
              "placement need graphs no profile measures and are left out.\n", flush=True)
    estimator = _estimator(path, None if simulated else device, plan.preset)
    partitioner = None
    if not simulated:
        from .partition import Partitioner

        partitioner = Partitioner(plan.backend)
    try:
        return colocation.main(plan, args.out, estimator, simulated, partitioner)
    finally:
        if partitioner is not None:
            partitioner.close()


def _gpu_slug(name: str) -> str:
    from .results import gpu_slug

    return gpu_slug(name)


def _run_profiler(preset: str, backend: str, quick: bool, out, resume: bool = True) -> Path:
    from .orchestrate.profiler import QUICK_GRID, Profiler, ProfileGrid, default_path

    grid = ProfileGrid(**QUICK_GRID) if quick else ProfileGrid()
    path = Path(out) if out else default_path(preset)
    command = " ".join(["bullet profile", "--model", preset, "--backend", backend] + (["--quick"] if quick else []))
    profiler = Profiler(preset, grid, path, backend=backend, resume=resume, command=command)
    profiler.run()
    print(f"profile: {path}")
    return path


def profile(args: argparse.Namespace) -> int:
    if args.interference is not None:
        return interference_report(args)
    device, reason = describe_state()
    if device is None:
        print(f"bullet profile: no GPU ({reason}); profiling measures graphs on a GPU. The shipped profiles "
              f"are in graphs/; `bullet bench` simulates from them without a GPU.")
        return 1
    _run_profiler(args.model, args.backend, args.quick, getattr(args, "out_file", None), resume=not args.fresh)
    return 0


def interference_report(args: argparse.Namespace) -> int:
    """The co-run table of a profile (no GPU needed): ``--interference FILE``, or this GPU's (the
    shipped H200 one without a GPU) for ``--model``."""
    from .orchestrate import interference
    from .orchestrate.profile import Profile, local_profile

    path = args.interference or local_profile(args.model)
    rows = interference.interference_rows(Profile.load(path))
    if not rows:
        print(f"bullet profile: {path} has no co-run points; `bullet profile` measures them")
        return 1
    print(f"co-run interference in {path}\n")
    print(interference.markdown(rows))
    for split, s in interference.summary(rows).items():
        print(f"{split}: median slowdown prefill {s['prefill_slowdown_median']:.2f}x, decode "
              f"{s['decode_slowdown_median']:.2f}x; work rate median {s['work_rate_median']:.2f}, best {s['work_rate_best']:.2f}")
    return 0


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=PresetNames(), metavar="PRESET",
                   help="model shape with random weights (nothing is downloaded); one of: %(choices)s")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKENDS,
                   help="SM partition backend: green contexts, TPC masks, or none (whole GPU)")
    p.add_argument("--out", type=out_dir_arg, default=DEFAULT_OUT,
                   help="folder for the result JSON and PNG (created if missing)")


def _add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_arguments(p)
    p.add_argument("--quick", action="store_true", help="fewer SM counts (a few partition sizes and the whole GPU)")
    p.add_argument("--prompt", type=positive_int, default=2048, metavar="TOKENS",
                   help="prefill tokens (one prompt)")
    p.add_argument("--decode-batch", type=positive_int, nargs="+", default=[32, 128], metavar="BATCH",
                   help="decode batch sizes (sequences per step)")
    p.add_argument("--context", type=positive_int, default=1024, metavar="TOKENS",
                   help="KV tokens per decode sequence")
    p.add_argument("--groups", type=positive_int, default=4,
                   help="prefill layer groups (one graph each; at most the preset's layers)")
    p.add_argument("--reps", type=positive_int, default=5,
                   help="timed replays per measured point")


# -- the parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bullet", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"bullet_kernels {__version__}")
    sub = parser.add_subparsers(title="subcommands", dest="command", required=True, metavar="{info,bench,profile,sweep,serve,bench-serving}")

    p_info = sub.add_parser(
        "info", help="device facts, backends and a verified partition table", formatter_class=HelpFormatter,
        description="GPU and driver facts, the partition backends and how each restricts kernels; then\n"
        "each --split opened on every available backend and verified by the %smid probe kernel\n"
        "(asked / granted / observed SMs per lane). Without a GPU: the facts that can be known.",
    )
    p_info.add_argument("--device", type=device_index, default=0, help="GPU index")
    p_info.add_argument("--split", type=split_arg, action="append", metavar="LANE=SMS,...", default=argparse.SUPPRESS,
                        help="a split to open and verify, e.g. prefill=96,decode=36 (append +overlap to let "
                        "tpc lanes share SMs); repeatable. Default: " + ", ".join(DEFAULT_INFO_SPLITS))
    p_info.add_argument("--no-verify", action="store_true", help="skip opening and verifying partitions")
    p_info.add_argument("--json", type=json_file_arg, metavar="FILE", default=argparse.SUPPRESS,
                        help="also write the report as JSON to FILE (its folder must exist); "
                        "without it, the report is only printed")
    p_info.set_defaults(func=info)

    p_bench = sub.add_parser(
        "bench", help="the main job: prefill beside decode, every mode in one run (simulated without a GPU)",
        formatter_class=HelpFormatter,
        description="Mixes A (a 4096-token prompt beside 6 decode steps of batch 128 at 2048 context) and\n"
        "B (2048 beside batch 32 at 1024), each run sequential, with chunked prefill, on each static\n"
        "split and orchestrated (SLO policy, lanes hand over the whole GPU), in one run; ratios against\n"
        "the better baseline with the SM-time bound. Needs the profile graphs/<gpu>/<model>.json (made\n"
        "first, quickly, where missing). Without a GPU: the same plans through the latency estimator\n"
        "on the shipped H200 profile, labelled a simulation; exit status 0.",
    )
    _add_model_arguments(p_bench)
    from .colocation import CHUNKS, DEFAULT_SPLITS, MIXES, TPOT_FACTOR

    p_bench.add_argument("--mix", nargs="+", default=list(MIXES), choices=list(MIXES), help="mixes to run")
    p_bench.add_argument("--split", type=split_arg, action="append", metavar="prefill=P,decode=D",
                         help="candidate split (repeatable; lanes 'prefill' and 'decode'). Default: "
                         + " ".join(DEFAULT_SPLITS))
    p_bench.add_argument("--chunk", type=positive_int, nargs="+", default=list(CHUNKS), metavar="TOKENS",
                         help="chunk sizes of the chunked-prefill baseline")
    p_bench.add_argument("--reps", type=positive_int, default=5, help="timed runs per mode")
    p_bench.add_argument("--tpot-factor", type=float, default=TPOT_FACTOR,
                         help="decode step target while co-located, as a multiple of its whole-GPU step")
    p_bench.add_argument("--profile", metavar="FILE", default=argparse.SUPPRESS,
                         help="latency profile to plan with (default: graphs/<gpu>/<model>.json)")
    p_bench.add_argument("--sweep", action="store_true",
                         help="also run the sweep: prompts of 1024, 2048, 4096 tokens beside decode batch 32 at "
                         "1024 and batch 128 at 2048 tokens of context")
    p_bench.add_argument("--simulate", action="store_true", help="simulate through the estimator even on a GPU")
    p_bench.set_defaults(func=bench)

    p_profile = sub.add_parser(
        "profile", help="measure the latency profile the orchestrator plans with (needs a GPU)",
        formatter_class=HelpFormatter,
        description="Decode steps (batch x context) and prefill layer groups (tokens) on the whole GPU and on\n"
        "each candidate split's lanes, and both lanes co-running, as CUDA-event timed graph replays with\n"
        "SM clock and power; writes graphs/<gpu>/<model>.json, saving as it goes (a rerun resumes).",
    )
    p_profile.add_argument("--model", default=DEFAULT_PRESET, choices=PresetNames(), metavar="PRESET",
                           help="model preset (random weights); one of: %(choices)s")
    p_profile.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKENDS, help="SM partition backend")
    p_profile.add_argument("--quick", action="store_true", help="a small grid (a minute or two)")
    p_profile.add_argument("--fresh", action="store_true", help="start over instead of resuming the file")
    p_profile.add_argument("--out", dest="out_file", metavar="FILE", default=argparse.SUPPRESS,
                           help="profile file to write (default: graphs/<gpu>/<model>.json)")
    p_profile.add_argument("--interference", nargs="?", const="", default=None, metavar="FILE",
                           help="instead of measuring: print the co-run table of a profile (default: this GPU's, "
                           "or the shipped H200 one without a GPU): each lane's slowdown beside the other and the "
                           "work rate (whole-GPU ms of work done per ms of co-running; above 1 co-running pays)")
    p_profile.set_defaults(func=profile)

    p_sweep = sub.add_parser(
        "sweep", help="prefill/decode latency against SM count (needs a GPU)", formatter_class=HelpFormatter,
        description="Captures the preset's prefill (per layer group) and decode graphs on a verified\n"
        "partition of each SM count and replays them there: prefill tokens/s and MFU, decode step\n"
        "latency and HBM bandwidth, against peaks measured in the same run on the whole GPU.",
    )
    _add_sweep_arguments(p_sweep)
    p_sweep.set_defaults(func=sweep, check=functools.partial(_check_sweep_shapes, p_sweep))

    p_bench.set_defaults(bench_parser=p_bench)

    from .serve import commands as serve_commands  # argparse only; the server loads on use

    p_serve = sub.add_parser(
        "serve", help="serve a model over HTTP (SGLang /generate, OpenAI completions and chat)",
        formatter_class=HelpFormatter,
        description="Continuous batching with prefill and decode on two lanes (bullet), fused chunked prefill\n"
        "(chunked) or prefill-first (sequential); streaming, /health and Prometheus /metrics.",
    )
    serve_commands.add_serve_arguments(p_serve, positive_int, PresetNames())
    p_serve.set_defaults(func=serve_commands.serve_main)
    p_load = sub.add_parser(
        "bench-serving", help="Poisson load against a server; latency percentiles and goodput",
        formatter_class=HelpFormatter,
        description="Replays a trace at each offered rate against SGLang's /generate API (ours or SGLang's),\n"
        "streaming; TTFT, TPOT, ITL at p50/p90/p99, throughput, and goodput per TPOT target.",
    )
    serve_commands.add_bench_serving_arguments(p_load, positive_int, out_dir_arg)
    p_load.set_defaults(func=serve_commands.bench_serving_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "check", None) is not None:
        args.check(args)  # cross-argument checks; parser.error exits 2
    try:
        return args.func(args)
    except BulletError as exc:
        print(f"bullet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
