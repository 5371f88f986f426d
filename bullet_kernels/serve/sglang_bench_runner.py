"""Run SGLang's ``bench_serving`` many times in one process (a script, run by path).

Why: each ``python -m sglang.bench_serving`` pays SGLang's import (torch, transformers, its own
packages) before it sends a request: 20-30 s on the H200 machine against 10-15 s of load per rate
(server logs of 2026-12-02), so a device lease spent most of a sweep starting clients, and the GPU
monitor around each run counted those idle seconds into the clock and power medians. This script
imports SGLang's benchmark once and calls its command-line entry point, ``cli_main()`` (a public
name of ``sglang.benchmark.serving`` in 0.5.15; ``sglang.bench_serving`` re-exports it and is its
older home), once per run. ``cli_main`` parses ``sys.argv`` and reseeds ``random`` and numpy
from ``--seed`` on every call, so a run here sends the same requests as a fresh process would.

It runs under the Python that has SGLang (``PYTHONPATH`` set by the caller) and imports nothing of
ours, so SGLang's pinned packages never meet our package. Protocol, one line each:
- stdin: a JSON list of strings, the arguments of one run (what follows ``-m sglang.bench_serving``);
- stdout: SGLang's own output passes through; after the import, a status line
  ``<marker>{"ready": true, "module": ...}`` (or ``"ready": false`` with the error, then exit 1),
  and after each run ``<marker>{"ok": true}`` or ``{"ok": false, "error": ...}``, each on a line
  of its own. The marker is ``$BULLET_SGLANG_BENCH_MARK`` (the caller makes it unique), else
  ``@@bullet-sglang-bench ``. End of stdin ends the process. Run it with ``python -u``: unbuffered,
  SGLang's stdout and stderr lines keep their order in the caller's error messages.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

MARK = "@@bullet-sglang-bench "
MARK_ENV = "BULLET_SGLANG_BENCH_MARK"  # the caller's own marker (it adds a nonce), else MARK
MODULES = ("sglang.benchmark.serving", "sglang.bench_serving")


def say(**status) -> None:
    # on a line of its own even after output that did not end one (a progress bar, print(end=""))
    sys.stdout.write("\n" + os.environ.get(MARK_ENV, MARK) + json.dumps(status) + "\n")
    sys.stdout.flush()


def drop_own_folder_from_path() -> None:
    """Run as a script, Python puts this folder first on sys.path, where our serve modules
    (metrics, server, traces, ...) would shadow any top-level module of those names SGLang imports."""
    if sys.path and os.path.realpath(sys.path[0] or ".") == os.path.dirname(os.path.realpath(__file__)):
        del sys.path[0]


def load():
    """SGLang's ``cli_main`` and the module it came from."""
    errors = []
    for name in MODULES:
        try:
            module = __import__(name, fromlist=["cli_main"])
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        if callable(getattr(module, "cli_main", None)):
            return module.cli_main, name
        errors.append(f"{name}: no cli_main()")
    raise ImportError("SGLang's benchmark is not importable here (" + "; ".join(errors) + ")")


def run_one(cli_main, args: list[str]) -> dict:
    sys.argv = ["sglang.bench_serving", *args]
    try:
        cli_main()
    except SystemExit as e:  # argparse errors and SGLang's own sys.exit(1)s
        if e.code not in (None, 0):
            return {"ok": False, "error": f"exited with {e.code!r}"}
    except BaseException:  # noqa: BLE001 - every failure goes back to the caller, with its traceback
        return {"ok": False, "error": traceback.format_exc()[-3000:]}
    return {"ok": True}


def main() -> int:
    drop_own_folder_from_path()
    try:
        cli_main, name = load()
    except ImportError as e:
        say(ready=False, error=str(e))
        return 1
    say(ready=True, module=name)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            args = json.loads(line)
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise ValueError("expected a JSON list of strings")
        except ValueError as e:
            say(ok=False, error=f"a request line that is not a JSON list of strings: {e}")
            continue
        say(**run_one(cli_main, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
