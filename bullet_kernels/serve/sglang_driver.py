"""Drive a server with SGLang's own load generator and read its results as ours.

The SGLang adapter issue asks for SGLang's numbers as SGLang's own benchmark reports them:
``python -m sglang.bench_serving`` (0.5.15; the module lives in ``sglang.benchmark.serving``),
one run per offered rate (all in one client process, :class:`BenchServingClient`), on the
offline SGLang README's trace (``--dataset-name random-ids --random-input-len 1024
--random-output-len 256 --random-range-ratio 0.5``: inputs 512-1024, outputs 128-256 tokens, the
lengths of our ``sglang-random`` trace, :mod:`.traces`).
Every engine driven this way with the same ``--seed`` gets the same requests.

With ``--output-details`` each run appends one JSON line holding, besides its aggregates, one
entry per request: ``input_lens``, ``output_lens``, ``ttfts`` (s), ``itls`` (s, one per chunk
after the first) and ``errors`` ("" when it succeeded). :func:`results_of` turns them into our
:class:`~.metrics.RequestResult`: the first token at its TTFT, then the chunks at the running
sum of the ITLs; a request with more tokens than chunks gets the rest with its last chunk, so
its TPOT is ``(latency - ttft) / (output_len - 1)``, as SGLang computes it. Start times are not
in the output, so send lag is unknown (None). Goodput, tables and plots are then ours.

SGLang's client (``--backend sglang``) starts a request's clock only at a streamed chunk with
non-empty text: a request whose tokens never decode to text comes back successful with TTFT 0
and no ITLs (43% of requests on the H200 until 2026-12-02, when the model directory's tokenizer
had 4,096 of the model's 128,256 ids; :func:`~bullet_kernels.models.tokenizer.padded_json` now
gives every id text). SGLang's own summary averages such zeros in; we leave them out of every
latency statistic and of goodput (:func:`is_untimed`), count them in the row's ``untimed``, and
keep them in the request and token throughput.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .metrics import RequestResult, summarize
from .sglang_bench_runner import MARK as RUNNER_MARK
from .sglang_bench_runner import MARK_ENV as RUNNER_MARK_ENV

DATASET_ARGS = ("--dataset-name", "random-ids", "--random-input-len", "1024", "--random-output-len", "256",
                "--random-range-ratio", "0.5")
DETAIL_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "errors")
MODULE = "sglang.bench_serving"


def bench_serving_args(url: str, rate: float, num_prompts: int, seed: int, model_dir: str, output_file: str,
                       tokenizer_dir: str | None = None) -> list[str]:
    """The arguments of one run of SGLang's benchmark at ``rate`` req/s (Poisson), its details
    appended to ``output_file``; its prompts made with the tokenizer of ``tokenizer_dir`` (default
    ``model_dir``)."""
    return ["--backend", "sglang", "--base-url", url, *DATASET_ARGS,
            "--num-prompts", str(num_prompts), "--request-rate", f"{rate:g}", "--seed", str(seed),
            "--model", model_dir, "--tokenizer", tokenizer_dir or model_dir, "--output-file", output_file,
            "--output-details", "--disable-tqdm"]


def bench_serving_argv(url: str, rate: float, num_prompts: int, seed: int, model_dir: str, output_file: str,
                       python: str = sys.executable, tokenizer_dir: str | None = None) -> list[str]:
    """The same run as one command line (``python -m sglang.bench_serving ...``): what a user types
    to repeat it, and what an error names."""
    return [python, "-m", MODULE, *bench_serving_args(url, rate, num_prompts, seed, model_dir, output_file,
                                                      tokenizer_dir)]


def results_of(record: dict) -> list[RequestResult]:
    """The requests of one run (one line of SGLang's output file), as our results."""
    missing = [k for k in DETAIL_KEYS if k not in record]
    if missing:
        raise ValueError(f"an SGLang bench_serving record without {', '.join(missing)}: run it with --output-details")
    n = len(record["ttfts"])
    if any(len(record[k]) != n for k in DETAIL_KEYS):
        raise ValueError(f"an SGLang bench_serving record whose lists differ in length: "
                         f"{ {k: len(record[k]) for k in DETAIL_KEYS} }")
    out = []
    for prompt, tokens, ttft, itls, error in zip(*(record[k] for k in DETAIL_KEYS)):
        ok = not error
        times = []
        if ok and tokens > 0:
            times = [ttft]
            for gap in itls:
                times.append(times[-1] + gap)
            times = times[:tokens] + [times[-1]] * max(0, tokens - len(times))
        out.append(RequestResult(prompt_len=prompt, output_len=tokens, arrival_s=0.0, start_s=0.0,
                                 first_token_s=ttft if times else None, token_times_s=times,
                                 end_s=times[-1] if times else 0.0, ok=ok, error=error or ""))
    return out


def is_untimed(r: RequestResult) -> bool:
    """A successful request SGLang's client never timed (no chunk with text: TTFT 0, no ITLs)."""
    return r.ok and r.first_token_s == 0.0 and all(t == 0.0 for t in r.token_times_s)


# The row keys counted over every request, timed or not; the rest come from the timed ones.
THROUGHPUT_KEYS = ("count", "ok", "failed", "request_throughput", "output_token_throughput", "input_tokens",
                   "output_tokens")


def row_of(record: dict, ttft_slo_s: float | None, tpot_slo_s: float | None) -> dict[str, Any]:
    """One rate's row in the shape of :func:`.loadgen.sweep`'s (``results`` kept: the timed ones)."""
    results = results_of(record)
    if not results:
        raise ValueError("an SGLang bench_serving record with no requests")
    timed = [r for r in results if not is_untimed(r)]
    if not timed:
        raise ValueError("no request of this SGLang bench_serving record was timed (none streamed text)")
    rate = record.get("request_rate")
    if not isinstance(rate, (int, float)) or not rate > 0:
        raise ValueError(f"an SGLang bench_serving record without a positive request_rate: {rate!r}")
    duration = record.get("duration")
    if not isinstance(duration, (int, float)) or not duration > 0:
        raise ValueError(f"an SGLang bench_serving record without a positive duration: {duration!r}")
    row = {"rate": float(rate), "n": len(results), **summarize(timed, float(duration), ttft_slo_s, tpot_slo_s)}
    whole = summarize(results, float(duration))
    row.update({k: whole[k] for k in THROUGHPUT_KEYS}, untimed=len(results) - len(timed))
    row["send_lag_p99_ms"] = None  # SGLang's output has no send times
    row["driver"] = MODULE
    row["results"] = [dataclasses.asdict(r) for r in timed]
    return row


class BenchServingClient:
    """SGLang's benchmark in one long-lived child process (:mod:`.sglang_bench_runner`): imported
    once, then run once per :meth:`run` call. ``pythonpath`` (where ``sglang`` imports, e.g. an
    offline wheel set) is given to the child only, so SGLang's pinned packages never shadow ours;
    a ``python`` other than ours (SGLang's own environment) gets none of our PYTHONPATH,
    VIRTUAL_ENV or PYTHONHOME either. A run that says nothing for ``run_timeout_s`` (a server that
    hangs) is an error and ends the child."""

    RUNNER = Path(__file__).with_name("sglang_bench_runner.py")
    IMPORT_TIMEOUT_S = 600.0

    def __init__(self, pythonpath: str | None = None, python: str = sys.executable, run_timeout_s: float = 1800.0):
        env = dict(os.environ)
        if os.path.realpath(python) != os.path.realpath(sys.executable):
            for key in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
                env.pop(key, None)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.mark = env[RUNNER_MARK_ENV] = f"{RUNNER_MARK.rstrip()}-{secrets.token_hex(6)} "  # no collision with output
        self.run_timeout_s = run_timeout_s
        self.output: collections.deque[str] = collections.deque(maxlen=200)  # the child's last lines, for errors
        # stderr joins stdout: one pipe, drained by a thread, so the child never blocks on it
        self.proc = subprocess.Popen([python, "-u", str(self.RUNNER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="sglang-bench-output", daemon=True)
        self._reader.start()
        status = self._status(self.IMPORT_TIMEOUT_S)
        if not status.get("ready"):
            self.close()
            raise RuntimeError(f"SGLang's benchmark did not start: {status.get('error')}\n{self.tail()}")
        self.module = status.get("module")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _status(self, timeout_s: float) -> dict:
        """The child's next status line; its other lines are kept for error messages."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                return {"error": f"no answer from SGLang's benchmark within {timeout_s:g} s (its process was ended)"}
            if line is None:
                return {"error": f"the benchmark process exited ({self.proc.wait()})"}
            if line.startswith(self.mark):
                try:
                    return json.loads(line[len(self.mark):])
                except ValueError:
                    pass  # not ours after all: kept as output
            if line.strip():
                self.output.append(line.rstrip("\n"))

    def tail(self, n: int = 40) -> str:
        return "\n".join(list(self.output)[-n:])

    def run(self, args: Sequence[str]) -> None:
        """One run with these arguments (those of ``python -m sglang.bench_serving``); raises
        with the child's output if it failed."""
        self.output.clear()
        try:
            self.proc.stdin.write(json.dumps(list(args)) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as e:
            raise RuntimeError(f"SGLang's benchmark process is gone ({e}):\n{self.tail()}") from e
        status = self._status(self.run_timeout_s)
        if not status.get("ok"):
            raise RuntimeError(f"{status.get('error')}\n{self.tail()}")

    def close(self) -> None:
        """End the child: its stdin closed (its loop ends), waited for, killed after 30 s."""
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)

    def __enter__(self) -> "BenchServingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run(url: str, rates: Sequence[float], num_prompts: int, seed: int, model_dir: str, workdir: str | Path,
        ttft_slo_s: float | None, tpot_slo_s: float | None, pythonpath: str | None = None,
        monitor: Callable[[], Any] | None = None, progress: Callable[[dict], Any] | None = None,
        tokenizer_dir: str | None = None) -> list[dict]:
    """SGLang's benchmark once per rate against ``url`` (one client process for all of them,
    :class:`BenchServingClient`), each row read back from its output file. ``tokenizer_dir``: where
    the client's tokenizer is (default ``model_dir``). A run that fails raises with its output and
    the command line that repeats it; the GPU ``monitor`` covers each run alone, not the import."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    with BenchServingClient(pythonpath) as client:
        for rate in rates:
            out_file = workdir / f"sglang-bench-serving-{rate:g}.jsonl"
            out_file.unlink(missing_ok=True)
            args = bench_serving_args(url, rate, num_prompts, seed, model_dir, str(out_file), tokenizer_dir)
            watch = monitor() if monitor is not None else contextlib.nullcontext()
            try:
                with watch:
                    client.run(args)
                if not out_file.exists():
                    raise RuntimeError(f"it wrote no {out_file}\n{client.tail()}")
            except RuntimeError as e:
                argv = bench_serving_argv(url, rate, num_prompts, seed, model_dir, str(out_file),
                                          tokenizer_dir=tokenizer_dir)
                raise RuntimeError(f"{' '.join(argv)} failed: {e}") from None
            lines = [ln for ln in out_file.read_text().splitlines() if ln.strip()]
            row = row_of(json.loads(lines[-1]), ttft_slo_s, tpot_slo_s)
            row["rate"] = float(rate)  # the rate asked for (SGLang echoes it; keep ours exact)
            if monitor is not None:
                row["gpu"] = watch.summary()
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows
