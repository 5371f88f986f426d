"""Load generator for ``bullet bench-serving``: replay a trace against an SGLang-style server.

Each request is ``POST {base_url}/generate`` with SGLang's native body
``{"input_ids": [...], "sampling_params": {"max_new_tokens": N, "temperature": 0,
"ignore_eos": true}, "stream": true}``, so it runs unchanged against our server and a real SGLang
one (same prompts, from :func:`~bullet_kernels.serve.traces.prompt_ids`). The reply is
Server-Sent Events, ``data: {json}`` lines ending with ``data: [DONE]``; the tokens a chunk
carries are the increase of its cumulative ``meta_info.completion_tokens`` (chunks may carry
several tokens, and text is not tokens).

:func:`run_trace` sends every request at its arrival time (open loop: a slow server does not
slow the sender, which is what exposes queueing) and records times with ``time.perf_counter()``
in seconds from the start. A failed request (HTTP error, broken or short stream, connection
error, timeout) becomes a :class:`~bullet_kernels.serve.metrics.RequestResult` with
``ok=False`` and the reason, never an exception: one bad request must not lose a run.
:func:`sweep` runs one trace per offered rate and returns summary rows; :func:`table` and
:func:`plot` show them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import aiohttp

from .metrics import RequestResult, summarize
from .traces import TraceRequest, prompt_ids

DEFAULT_TIMEOUT_S = 600.0  # per request, from send to the last token
WARMUP = TraceRequest(prompt_len=16, output_len=4, arrival_s=0.0)


class _Failed(Exception):
    """A request went wrong in a way the server told us or the stream showed."""


def _payload(req: TraceRequest, vocab_size: int, seed: int, index: int) -> bytes:
    body = {"input_ids": prompt_ids(req, vocab_size, seed, index),
            "sampling_params": {"max_new_tokens": req.output_len, "temperature": 0, "ignore_eos": True},
            "stream": True}
    return json.dumps(body).encode()


def _chunk_tokens(line: bytes) -> int | None:
    """Cumulative ``completion_tokens`` of one SSE ``data:`` line; None for ``[DONE]``."""
    data = line[len(b"data:"):].strip()
    if data == b"[DONE]":
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        raise _Failed(f"bad SSE chunk (not JSON): {data[:200]!r}") from None
    if not isinstance(obj, dict):
        raise _Failed(f"bad SSE chunk (not an object): {data[:200]!r}")
    if "error" in obj:
        raise _Failed(f"server error in stream: {str(obj['error'])[:300]}")
    n = (obj.get("meta_info") or {}).get("completion_tokens")
    if isinstance(n, bool) or not isinstance(n, int):
        raise _Failed(f"SSE chunk without an int meta_info.completion_tokens: {data[:200]!r}")
    return n


async def _stream(session: aiohttp.ClientSession, url: str, payload: bytes, token_times: list[float],
                  clock: Callable[[], float]) -> None:
    """POST one request and append one time per received token to ``token_times``."""
    async with session.post(url, data=payload, headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            body = (await resp.text(errors="replace"))[:300]
            raise _Failed(f"HTTP {resp.status}: {body}")
        buf, count = b"", 0
        async for data in resp.content.iter_any():
            now = clock()  # every token in this read arrived together
            *lines, buf = (buf + data).split(b"\n")
            for line in lines:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event: lines
                n = _chunk_tokens(line)
                if n is None:
                    return
                if n < count:
                    raise _Failed(f"completion_tokens went down from {count} to {n}")
                token_times.extend([now] * (n - count))
                count = n
    raise _Failed("stream ended without 'data: [DONE]'")


async def _request(session: aiohttp.ClientSession, url: str, req: TraceRequest, payload: bytes,
                   t0: float, sem: asyncio.Semaphore | None, timeout_s: float) -> RequestResult:
    def clock() -> float:
        return time.perf_counter() - t0

    delay = req.arrival_s - clock()
    if delay > 0:
        await asyncio.sleep(delay)
    async with sem if sem is not None else contextlib.nullcontext():
        start = clock()
        times: list[float] = []
        error = ""
        try:
            await asyncio.wait_for(_stream(session, url, payload, times, clock), timeout_s)
            if len(times) != req.output_len:
                error = f"got {len(times)} output tokens, asked for {req.output_len} (ignore_eos)"
        except asyncio.TimeoutError:
            error = f"timeout: no complete reply within {timeout_s} s ({len(times)} tokens received)"
        except _Failed as e:
            error = str(e)
        except Exception as e:  # connection refused, reset, payload errors...: record, never raise
            error = f"{type(e).__name__}: {e}"
        return RequestResult(prompt_len=req.prompt_len, output_len=req.output_len, arrival_s=req.arrival_s,
                             start_s=start, first_token_s=times[0] if times else None, token_times_s=times,
                             end_s=clock(), ok=not error, error=error)


def _check_args(base_url: str, vocab_size: int, timeout_s: float, max_concurrency: int | None) -> str:
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    if max_concurrency is not None and (isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int)
                                        or max_concurrency < 1):
        raise ValueError(f"max_concurrency must be an int >= 1 or None (no limit), got {max_concurrency!r}")
    prompt_ids(WARMUP, vocab_size, 0, 0)  # checks vocab_size
    return base_url.rstrip("/") + "/generate"


def _session() -> aiohttp.ClientSession:
    # limit=0: aiohttp's default pool of 100 connections would cap concurrency and queue
    # requests client-side, hiding the server's queueing; the timeout is ours (wait_for).
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=None))


async def run_trace(base_url: str, trace: Sequence[TraceRequest], vocab_size: int, seed: int = 0,
                    timeout_s: float = DEFAULT_TIMEOUT_S, max_concurrency: int | None = None) -> list[RequestResult]:
    """Send every request of ``trace`` at its ``arrival_s`` (seconds from the start), stream the
    replies, and return one :class:`RequestResult` per request in trace order. Prompts are
    ``prompt_ids(request, vocab_size, seed, index)``, built before the clock starts.
    ``max_concurrency`` caps requests in flight (later ones wait, and their TTFT counts from
    when they are sent); ``timeout_s`` bounds each request from send to last token."""
    url = _check_args(base_url, vocab_size, timeout_s, max_concurrency)
    if not trace:
        raise ValueError("run_trace: the trace is empty; give at least one request")
    payloads = [_payload(r, vocab_size, seed, i) for i, r in enumerate(trace)]
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with _session() as session:
        t0 = time.perf_counter()
        return list(await asyncio.gather(
            *(_request(session, url, r, p, t0, sem, timeout_s) for r, p in zip(trace, payloads))))


async def warmup(base_url: str, vocab_size: int, seed: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S) -> RequestResult:
    """One short request (16 prompt tokens, 4 output) whose prompt is no trace's prefix (index
    -1), so the first measured request does not pay for lazy start-up."""
    url = _check_args(base_url, vocab_size, timeout_s, None)
    async with _session() as session:
        return await _request(session, url, WARMUP, _payload(WARMUP, vocab_size, seed, -1),
                              time.perf_counter(), None, timeout_s)


def _compact(result: dict) -> dict:
    """Times rounded to 1 us: the clock's useful resolution here, and a third of the JSON size
    (a sweep keeps every token's arrival time)."""
    out = dict(result)
    for key, v in result.items():
        if isinstance(v, float):
            out[key] = round(v, 6)
        elif isinstance(v, list):
            out[key] = [round(x, 6) if isinstance(x, float) else x for x in v]
    return out


def duration_of(results: Sequence[RequestResult]) -> float:
    """A run's length: from its start to the last reply (the throughputs' denominator)."""
    return max(max(r.end_s for r in results), 1e-9)


def sweep(base_url: str, rates: Sequence[float], make_trace: Callable[[float], Sequence[TraceRequest]],
          vocab_size: int, seed: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S,
          max_concurrency: int | None = None, warm_up: bool = True, ttft_slo_s: float | None = None,
          tpot_slo_s: float | None = None, keep_results: bool = True,
          progress: Callable[[dict], Any] | None = None, monitor: Callable[[], Any] | None = None) -> list[dict]:
    """Run ``make_trace(rate)`` at each rate in turn (each run drains before the next starts)
    and return one row per rate: ``{"rate", "n", **summarize(...)}``, plus ``"results"`` (each
    request as a dict, JSON-ready) when ``keep_results``. With ``warm_up`` one short request goes
    first and a failed warm-up raises ``RuntimeError`` (no server: nothing to measure).
    ``progress(row)`` is called after each rate. ``monitor()`` (e.g. :class:`~bullet_kernels.measure.GpuMonitor`)
    gives a context manager run around each rate whose ``summary()`` joins the row (SM clock, power). Not callable from inside a running event loop
    (it uses ``asyncio.run``); await :func:`run_trace` there."""
    _check_args(base_url, vocab_size, timeout_s, max_concurrency)
    if not rates:
        raise ValueError("sweep needs at least one rate (req/s)")

    async def go() -> list[dict]:
        if warm_up:
            w = await warmup(base_url, vocab_size, seed, timeout_s)
            if not w.ok:
                raise RuntimeError(f"warm-up request to {base_url}/generate failed: {w.error}; "
                                   "is the server up and serving SGLang's /generate?")
        rows = []
        for rate in rates:
            trace = list(make_trace(rate))
            watch = monitor() if monitor is not None else contextlib.nullcontext()
            with watch:
                results = await run_trace(base_url, trace, vocab_size, seed, timeout_s, max_concurrency)
            row = {"rate": rate, "n": len(trace),
                   **summarize(results, duration_of(results), ttft_slo_s, tpot_slo_s)}
            if monitor is not None:
                row["gpu"] = watch.summary()
            if keep_results:
                row["results"] = [_compact(dataclasses.asdict(r)) for r in results]
            rows.append(row)
            if progress is not None:
                progress(row)
        return rows

    return asyncio.run(go())


# ------------------------------------------------------------------------------ presentation


def _fmt(v: Any, spec: str = ".1f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


TABLE_COLUMNS = (  # (header, row key, format)
    ("rate", "rate", ".2f"), ("ok", "ok", "d"), ("failed", "failed", "d"),
    ("req/s", "request_throughput", ".2f"), ("tok/s", "output_token_throughput", ".0f"),
    ("TTFT p50", "ttft_p50_ms", ".1f"), ("TTFT p90", "ttft_p90_ms", ".1f"), ("TTFT p99", "ttft_p99_ms", ".1f"),
    ("TPOT p50", "tpot_p50_ms", ".2f"), ("TPOT p90", "tpot_p90_ms", ".2f"), ("TPOT p99", "tpot_p99_ms", ".2f"),
    ("ITL p99", "itl_p99_ms", ".2f"), ("SLO att", "slo_attainment", ".3f"),
)


def table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of sweep rows (latencies in ms; '-' where there is no value)."""
    cells = [[h for h, _, _ in TABLE_COLUMNS]]
    cells += [[_fmt(row.get(k), f) for _, k, f in TABLE_COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(TABLE_COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def plot(rows: Sequence[dict], path: str | Path, title: str = "serving: P90 latency vs offered rate") -> Path:
    """PNG of P90 TTFT and P90 TPOT against offered rate (finite rates only), with the SLOs as
    dashed lines where the rows carry them; returns the PNG path (``path`` with .png)."""
    return plot_series({"": rows}, path, title)


def plot_series(series: dict[str, Sequence[dict]], path: str | Path, title: str) -> Path:
    """:func:`plot` with one line per labelled run (an empty label: no legend entry)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..results import save_figure

    points = {label: sorted((r for r in rows if isinstance(r.get("rate"), (int, float)) and math.isfinite(r["rate"])),
                            key=lambda r: r["rate"]) for label, rows in series.items()}
    if not any(points.values()):
        raise ValueError("plot needs at least one row with a finite 'rate'")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, slo, label in ((axes[0], "ttft_p90_ms", "ttft_slo_s", "P90 TTFT (ms)"),
                                (axes[1], "tpot_p90_ms", "tpot_slo_s", "P90 TPOT (ms)")):
        for name, pts in points.items():
            xy = [(r["rate"], r[key]) for r in pts if r.get(key) is not None]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=name or None)
        slos = {r.get(slo) for pts in points.values() for r in pts} - {None}
        if len(slos) == 1:
            ax.axhline(slos.pop() * 1e3, linestyle="--", color="gray", label="SLO")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    return save_figure(fig, path, title)
