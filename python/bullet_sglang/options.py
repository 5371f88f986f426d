"""The launcher's own options, split from SGLang's, and the setups the adapter refuses.

``--enable-bullet`` and ``--bullet-*`` are removed from the command line before SGLang parses it
(SGLang's parser rejects flags it does not know). Everything is decided from the command line
alone, before SGLang starts or any GPU memory is taken. The options travel to SGLang's scheduler
processes (spawned, so they inherit the environment, not our Python state) as JSON in
``BULLET_SGLANG_CONFIG``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Sequence

ENV = "BULLET_SGLANG_CONFIG"
PARTITIONS = ("green", "tpc")
# bullet_kernels.orchestrate.TPOT_MODES, restated so this module imports nothing of ours before
# SGLang starts (a test checks the two agree)
TPOT_MODES = ("step", "average")
# graph_runner.DECODE_LINEARS, restated for the same reason (a test checks the two agree)
DECODE_LINEARS = ("cublas", "cublaslt-target")


class UnsupportedSetup(ValueError):
    """A setup the adapter cannot run; the message says which option and what is allowed."""


@dataclasses.dataclass(frozen=True)
class BulletOptions:
    enable: bool = False
    ttft_slo_ms: float = 1000.0
    tpot_slo_ms: float = 20.0
    partition: str = "green"
    # Correct the profile's decode steps by measured ones (orchestrate.feedback): the profile was
    # measured with our kernels, SGLang's steps take longer (docs/sglang-adapter.md).
    step_feedback: bool = True
    # Overlap the scheduler's CPU work with decode steps, prefills issued in its slack (overlap.py). On
    # since its second version was measured on the H200 (ea7b8de: tokens equal to SGLang's, greedy and
    # seeded sampling; TPOT P90 7.8-9.2 ms at 10-19 req/s where pdmux's own loop gave 16 ms at 10);
    # "off" keeps pdmux's loop.
    overlap: bool = True
    # "step": every decode step beside a prefill within the TPOT target; "average": the target as
    # a per-request mean, co-running steps using the slack of steps alone
    # (bullet_kernels.orchestrate.tpot_budget). Step until average is measured on the GPU.
    tpot_mode: str = "step"
    # "cublaslt-target": each split's decode graphs captured with cuBLASLt told the decode lane's SM
    # count (graph_runner.py); "cublas" keeps SGLang's own choice. The default since measured inside
    # SGLang on the H200 (962cddb, one lease, same trace): policy 10 ms served 25 req/s at P90 TPOT
    # <= 10 ms against 22 with cublas, its steps on the 32-SM lane 0.3-0.5 ms over the profile
    # against 0.6-1.1 ms (docs/sglang-adapter.md).
    decode_linear: str = "cublaslt-target"
    # Resolved by the launcher before SGLang starts (bullet_sglang.setup), not given by users:
    profile: str = ""  # the latency profile the policy plans with

    def __post_init__(self):
        for name in ("ttft_slo_ms", "tpot_slo_ms"):
            if not getattr(self, name) > 0:
                raise UnsupportedSetup(f"--bullet-{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.partition not in PARTITIONS:
            raise UnsupportedSetup(f"--bullet-partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        if self.tpot_mode not in TPOT_MODES:
            raise UnsupportedSetup(f"--bullet-tpot-mode must be one of {', '.join(TPOT_MODES)}, got {self.tpot_mode!r}")
        if self.decode_linear not in DECODE_LINEARS:
            raise UnsupportedSetup(f"--bullet-decode-linear must be one of {', '.join(DECODE_LINEARS)}, "
                                   f"got {self.decode_linear!r}")

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls, environ=os.environ) -> "BulletOptions | None":
        raw = environ.get(ENV)
        return None if not raw else cls(**json.loads(raw))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bullet_sglang.launch_server", add_help=False)
    p.add_argument("--enable-bullet", action="store_true")
    p.add_argument("--bullet-ttft-slo-ms", type=float, default=BulletOptions.ttft_slo_ms)
    p.add_argument("--bullet-tpot-slo-ms", type=float, default=BulletOptions.tpot_slo_ms)
    p.add_argument("--bullet-partition", default=BulletOptions.partition)
    p.add_argument("--bullet-step-feedback", default="on" if BulletOptions.step_feedback else "off")
    p.add_argument("--bullet-overlap", default="on" if BulletOptions.overlap else "off")
    p.add_argument("--bullet-tpot-mode", default=BulletOptions.tpot_mode)
    p.add_argument("--bullet-decode-linear", default=BulletOptions.decode_linear)
    return p


def split_argv(argv: Sequence[str]) -> tuple[BulletOptions, list[str]]:
    """``(our options, SGLang's argv)``. A ``--bullet-*`` option without ``--enable-bullet`` is
    refused (it would be silently ignored otherwise)."""
    ours, rest = _parser().parse_known_args(list(argv))
    bullet_given = [a for a in argv if a.startswith("--bullet-")]
    if bullet_given and not ours.enable_bullet:
        raise UnsupportedSetup(f"{bullet_given[0].split('=')[0]} needs --enable-bullet")
    for flag, value in (("--bullet-step-feedback", ours.bullet_step_feedback), ("--bullet-overlap", ours.bullet_overlap)):
        if value not in ("on", "off"):
            raise UnsupportedSetup(f"{flag} must be on or off, got {value!r}")
    opts = BulletOptions(ours.enable_bullet, ours.bullet_ttft_slo_ms, ours.bullet_tpot_slo_ms, ours.bullet_partition,
                         ours.bullet_step_feedback == "on", ours.bullet_overlap == "on", ours.bullet_tpot_mode,
                         ours.bullet_decode_linear)
    return opts, rest


def value_of(argv: Sequence[str], *names: str) -> str | None:
    """The value of the last ``--name value`` / ``--name=value`` among ``names`` in ``argv``."""
    found = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                found = argv[i + 1]
            elif arg.startswith(name + "="):
                found = arg.split("=", 1)[1]
    return found


def _refuse(tp, pp, dp, spec, disagg, chunk, pdmux, unpadded, pdmux_config, mixed, grpc, ray) -> None:
    """The refusals shared by the argv check and the parsed one (each argument as SGLang names it)."""
    for name, value in (("tensor parallel size", tp), ("--pp-size", pp), ("--dp-size", dp)):
        if value is not None and str(value) != "1":
            raise UnsupportedSetup(f"--enable-bullet supports {name} 1 only (one GPU), got {value}")
    if chunk is not None and str(chunk) != "-1":
        raise UnsupportedSetup(f"--enable-bullet prefills whole prompts as layer groups on the prefill lane; "
                               f"--chunked-prefill-size {chunk} asks for chunked prefill, which it replaces (give -1 "
                               "or leave it out)")
    if spec is not None and str(spec).lower() not in ("none", ""):
        raise UnsupportedSetup(f"--enable-bullet does not support speculative decoding (--speculative-algorithm {spec})")
    if disagg is not None and disagg != "null":
        raise UnsupportedSetup(f"--enable-bullet does not support PD disaggregation (--disaggregation-mode {disagg}); "
                               "it co-locates prefill and decode on one GPU instead")
    if unpadded:
        raise UnsupportedSetup("--enable-bullet needs decode graphs padded to their buckets: with "
                               "--disable-cuda-graph-padding SGLang 0.5.15's per-stream-group graphs are never found "
                               "(every decode step would run without a graph)")
    if pdmux_config:
        raise UnsupportedSetup("--enable-bullet chooses the SM splits itself (our verified lanes and SLO policy); "
                               "--pdmux-config-path configures SGLang's own PD-multiplexing")
    if mixed:
        raise UnsupportedSetup("--enable-bullet runs prefill and decode on their own lanes; --enable-mixed-chunk "
                               "fuses them into one batch")
    for flag, what, given in (("--grpc-mode", "SGLang's gRPC server", grpc), ("--use-ray", "Ray-managed scheduler processes", ray)):
        if given:
            raise UnsupportedSetup(f"--enable-bullet starts SGLang's HTTP server with its scheduler processes; {flag} "
                                   f"asks for {what}, which the adapter does not hook")
    if pdmux:
        raise UnsupportedSetup("--enable-bullet and --enable-pdmux both partition the GPU between prefill and decode; "
                               "give one of them")


def check_supported(opts: BulletOptions, sglang_argv: Sequence[str]) -> None:
    """Refuse, with the reason, SGLang options the adapter cannot run beside ``--enable-bullet``
    (nothing to check without it: then SGLang runs unmodified). From the command line alone,
    before SGLang is imported; :func:`check_parsed` repeats it on SGLang's parsed arguments."""
    if not opts.enable:
        return
    _refuse(tp=value_of(sglang_argv, "--tp-size", "--tp", "--tensor-parallel-size"),
            pp=value_of(sglang_argv, "--pp-size", "--pipeline-parallel-size"),
            dp=value_of(sglang_argv, "--dp-size", "--data-parallel-size"),
            spec=value_of(sglang_argv, "--speculative-algorithm"),
            disagg=value_of(sglang_argv, "--disaggregation-mode"),
            chunk=value_of(sglang_argv, "--chunked-prefill-size"),
            pdmux="--enable-pdmux" in sglang_argv,
            unpadded="--disable-cuda-graph-padding" in sglang_argv,
            pdmux_config=value_of(sglang_argv, "--pdmux-config-path") is not None,
            mixed="--enable-mixed-chunk" in sglang_argv,
            grpc="--grpc-mode" in sglang_argv, ray="--use-ray" in sglang_argv)


def parse_sglang_argv(sglang_argv: Sequence[str]):
    """SGLang's own parser on ``sglang_argv`` as given (an ``argparse.Namespace`` of ServerArgs'
    fields, before ServerArgs fills in its defaults): what the user asked for, abbreviations
    resolved. Imports SGLang; takes no GPU memory."""
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="python -m bullet_sglang.launch_server")
    ServerArgs.add_cli_args(parser)
    return parser.parse_args(list(sglang_argv))


def check_parsed(server_args) -> None:
    """:func:`check_supported`'s refusals on SGLang's parsed arguments (:func:`parse_sglang_argv`,
    or a ``ServerArgs``): SGLang's parser takes abbreviated options (``--dp 2``,
    ``--speculative-algo EAGLE``, ``--enable-pd``, ``--chunked-prefill 2048``), which the
    command-line check cannot see."""
    get = lambda name, default=None: getattr(server_args, name, default)  # noqa: E731
    _refuse(tp=get("tp_size", 1), pp=get("pp_size", 1), dp=get("dp_size", 1), spec=get("speculative_algorithm"),
            disagg=get("disaggregation_mode", "null"), chunk=get("chunked_prefill_size"), pdmux=bool(get("enable_pdmux")),
            unpadded=bool(get("disable_cuda_graph_padding")), pdmux_config=bool(get("pdmux_config_path")),
            mixed=bool(get("enable_mixed_chunk")), grpc=bool(get("grpc_mode")), ray=bool(get("use_ray")))


def sglang_argv_for_bullet(sglang_argv: Sequence[str]) -> list[str]:
    """SGLang's argv with the settings the bullet loop needs added where missing: whole-prompt
    prefills and the scheduler without its overlap thread, which SGLang's split-prefill loop
    (the one --enable-bullet runs) requires, as its own --enable-pdmux does."""
    argv = list(sglang_argv)
    if value_of(argv, "--chunked-prefill-size") is None:
        argv += ["--chunked-prefill-size", "-1"]
    if "--disable-overlap-schedule" not in argv:
        argv.append("--disable-overlap-schedule")
    return argv
