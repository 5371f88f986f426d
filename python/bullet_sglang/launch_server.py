"""``python -m bullet_sglang.launch_server <SGLang server args> [--enable-bullet ...]``.

Checks, before any GPU memory is taken: our options and the SGLang options they cannot run
with, first on the command line alone (:mod:`.options`), the installed SGLang version
(:mod:`.version`) and, with ``--enable-bullet``, every SGLang extension point the adapter hooks
(:mod:`.hooks`, read from SGLang's source), then on SGLang's own parse of the arguments
(abbreviated options resolved), a latency profile for the parsed model and GPU (:mod:`.setup`,
GPU name through NVML) and the partition backend on that GPU (a driver query, no context).
Without ``--enable-bullet`` it starts SGLang unmodified, so the baseline and the adapter are
launched the same way.

With ``--enable-bullet`` SGLang's HTTP server starts as usual, with our scheduler-process entry
(:mod:`.child`): the scheduler runs SGLang's split-prefill loop on our verified lanes, the split
chosen by our SLO policy (docs/sglang-adapter.md has what was measured on the H200).

SGLang spawns its scheduler processes and re-imports this module in each of them, so its top
level stays light: everything happens in :func:`main`.
"""

from __future__ import annotations

import os
import sys

STARTING = ("--enable-bullet: SGLang {version} with bullet_sglang {ours} (profile {profile}, {partition} lanes, "
            "TPOT target {tpot:g} ms, {tpot_mode} mode, decode GEMMs {decode_linear})")


def main(argv: list[str] | None = None) -> int:
    from . import __version__
    from .hooks import check_hook_points, installed_source_root
    from .options import (ENV, UnsupportedSetup, check_parsed, check_supported, parse_sglang_argv,
                          sglang_argv_for_bullet, split_argv)
    from .setup import check_partition, resolve
    from .version import UnsupportedSGLang, check_sglang_version

    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, sglang_argv = split_argv(argv)
        check_supported(opts, sglang_argv)
        version = check_sglang_version()
        if opts.enable:
            problems = check_hook_points(installed_source_root())
            if problems:
                raise UnsupportedSGLang("SGLang's extension points differ from what bullet_sglang hooks:\n  "
                                        + "\n  ".join(problems))
            # SGLang's parser resolves abbreviated options (--dp 2, --base-gpu 1), which the
            # command-line check cannot see: check what the user asked for, then what will run.
            check_parsed(parse_sglang_argv(sglang_argv))
            from sglang.srt.server_args import prepare_server_args

            server_args = prepare_server_args(sglang_argv_for_bullet(sglang_argv))
            check_parsed(server_args)
            # the profile and lanes for the model and GPU SGLang parsed
            opts = resolve(opts, ["--model-path", server_args.model_path, "--base-gpu-id", str(server_args.base_gpu_id)])
            check_partition(opts.partition, server_args.base_gpu_id)
    except (UnsupportedSetup, UnsupportedSGLang) as exc:
        print(f"bullet_sglang: error: {exc}", file=sys.stderr)
        return 2
    if not opts.enable:
        # SGLang's own entry module, exactly as `python -m sglang.launch_server` runs it (plugins,
        # server dispatch, and its clean-up of child processes on the way out).
        import runpy

        sys.argv = ["sglang.launch_server", *sglang_argv]
        runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
        return 0
    os.environ[ENV] = opts.to_env()  # the spawned scheduler processes read it
    print("bullet_sglang: " + STARTING.format(version=version, ours=__version__, profile=opts.profile,
                                              partition=opts.partition, tpot=opts.tpot_slo_ms,
                                              tpot_mode=opts.tpot_mode, decode_linear=opts.decode_linear),
          file=sys.stderr)
    from sglang.srt.entrypoints.http_server import launch_server
    from sglang.srt.utils import kill_process_tree

    from .child import run_scheduler_process

    try:
        launch_server(server_args, run_scheduler_process_func=run_scheduler_process)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
