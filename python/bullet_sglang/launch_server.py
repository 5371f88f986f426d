"""``python -m bullet_sglang.launch_server <SGLang server args> [--enable-bullet ...]``.

Checks, before SGLang is imported or any GPU memory is taken: our options and the SGLang
options they cannot run with (:mod:`.options`), the installed SGLang version (:mod:`.version`)
and, with ``--enable-bullet``, every SGLang extension point the adapter hooks (:mod:`.hooks`).
Without ``--enable-bullet`` it starts SGLang unmodified, so the baseline and the adapter are
launched the same way.

Status: the co-location inside SGLang's scheduler is not built yet, so ``--enable-bullet`` stops
after the checks with a clear message (exit status 2) instead of pretending.

SGLang spawns its scheduler processes and re-imports this module in each of them, so its top
level stays light: everything happens in :func:`main`.
"""

from __future__ import annotations

import sys

NOT_BUILT = ("--enable-bullet: every check passed (options, SGLang {version}, {points} hook points), but the "
             "co-location inside SGLang's scheduler is not built yet in bullet_sglang {ours}; run without "
             "--enable-bullet for unmodified SGLang, or use `bullet serve` for bullet_kernels' own server")


def main(argv: list[str] | None = None) -> int:
    from . import __version__
    from .hooks import HOOK_POINTS, check_hook_points, installed_source_root
    from .options import UnsupportedSetup, check_supported, split_argv
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
    except (UnsupportedSetup, UnsupportedSGLang) as exc:
        print(f"bullet_sglang: error: {exc}", file=sys.stderr)
        return 2
    if opts.enable:
        print("bullet_sglang: " + NOT_BUILT.format(version=version, points=len(HOOK_POINTS), ours=__version__),
              file=sys.stderr)
        return 2
    # SGLang's own entry module, exactly as `python -m sglang.launch_server` runs it (plugins,
    # server dispatch, and its clean-up of child processes on the way out).
    import runpy

    sys.argv = ["sglang.launch_server", *sglang_argv]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
