"""Serving metrics: per-request latencies, run summaries and goodput (pure functions).

Times are seconds from the start of a run (the load generator's clock). A request's latencies:

- TTFT (time to first token): ``first_token_s - start_s``, from when the request was *sent*
  (as vLLM's and SGLang's benchmarks measure it). Without ``max_concurrency`` the sender keeps
  to the trace, so start and arrival differ by the event loop's lateness, which
  :func:`summarize` reports as ``send_lag_*`` so a client that fell behind is seen.
- TPOT (time per output token): ``(last token - first token) / (tokens - 1)``; none for fewer
  than two tokens.
- ITL (inter-token latencies): gaps between consecutive token arrivals. A chunk carrying k
  tokens gives k entries at its time, hence k - 1 zero gaps: ITL describes what a client saw.

Latency percentiles are over successful requests. SLO attainment is over *all* requests, a
failed one counting as a miss. Goodput, the project's serving headline, is "the highest rate at
which >= 90% of requests meet both SLOs"; :func:`goodput_by_attainment` answers that per
request, :func:`goodput_by_p90` through the P90 of each metric (P90 TTFT <= TTFT SLO and P90
TPOT <= TPOT SLO). They ask the same question two ways and usually agree; they differ when the
requests that miss one SLO are not the ones that miss the other. Neither interpolates between
the last passing and the first failing rate: the answer is the highest *measured* passing rate,
or None when none passes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from ..measure import percentile as pct  # not `percentile`: goodput takes a parameter of that name

PERCENTILES = (50, 90, 99)


@dataclasses.dataclass
class RequestResult:
    """What the load generator saw of one request (times in seconds from the run's start).

    ``token_times_s`` has one entry per output token received (a chunk carrying k tokens adds k
    entries at its arrival time); ``first_token_s`` is None when no token came back."""

    prompt_len: int
    output_len: int  # tokens asked for
    arrival_s: float  # when the trace said to send it
    start_s: float  # when it was sent
    first_token_s: float | None
    token_times_s: list[float]
    end_s: float
    ok: bool = True
    error: str = ""


def as_result(r: RequestResult | dict) -> RequestResult:
    """Accept a RequestResult or its ``dataclasses.asdict`` form (how result files keep them)."""
    return r if isinstance(r, RequestResult) else RequestResult(**r)


def ttft_s(r: RequestResult) -> float | None:
    """Time to first token, from when the request was sent; None if no token came."""
    return None if r.first_token_s is None else r.first_token_s - r.start_s


def tpot_s(r: RequestResult) -> float | None:
    """Mean time per output token after the first; None for fewer than two tokens."""
    t = r.token_times_s
    return (t[-1] - t[0]) / (len(t) - 1) if len(t) >= 2 else None


def itl_s(r: RequestResult) -> list[float]:
    """Gaps between consecutive token arrivals (k - 1 zeros for a chunk of k tokens)."""
    t = r.token_times_s
    return [b - a for a, b in zip(t, t[1:])]


def meets_slo(r: RequestResult, ttft_slo_s: float | None, tpot_slo_s: float | None) -> bool:
    """Whether ``r`` succeeded and meets every SLO given (None: not checked). A request with one
    output token has no TPOT and so cannot miss the TPOT SLO; one with no token misses TTFT."""
    if not r.ok:
        return False
    if ttft_slo_s is not None:
        t = ttft_s(r)
        if t is None or t > ttft_slo_s:
            return False
    if tpot_slo_s is not None:
        t = tpot_s(r)
        if t is not None and t > tpot_slo_s:
            return False
    return True


def slo_attainment(results: Sequence[RequestResult | dict], ttft_slo_s: float | None,
                   tpot_slo_s: float | None) -> float:
    """Fraction of all requests (failures count as misses) that meet the SLOs given."""
    if not results:
        raise ValueError("slo_attainment of no requests: run at least one")
    rs = [as_result(r) for r in results]
    return sum(meets_slo(r, ttft_slo_s, tpot_slo_s) for r in rs) / len(rs)


def _check_slo(name: str, v: float | None) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
        raise ValueError(f"{name} must be a number of seconds > 0 or None, got {v!r}")


def _pcts(prefix: str, values_s: list[float]) -> dict[str, float | None]:
    """``{prefix}_p50_ms`` ... in milliseconds; None where there are no samples."""
    return {f"{prefix}_p{q}_ms": (pct(values_s, q) * 1e3 if values_s else None) for q in PERCENTILES}


def summarize(results: Sequence[RequestResult | dict], duration_s: float,
              ttft_slo_s: float | None = None, tpot_slo_s: float | None = None) -> dict[str, Any]:
    """One run's summary: counts, throughputs over ``duration_s``, TTFT/TPOT/ITL percentiles in
    ms (successful requests only), send lag, and ``slo_attainment`` over all requests when an
    SLO is given (None otherwise). The SLOs are kept in the dict, so :func:`goodput_by_attainment`
    can check a summary was made against the SLOs it is asked about."""
    if not results:
        raise ValueError("summarize needs at least one request result")
    if not (isinstance(duration_s, (int, float)) and duration_s > 0):
        raise ValueError(f"duration_s must be > 0 seconds, got {duration_s!r}")
    _check_slo("ttft_slo_s", ttft_slo_s)
    _check_slo("tpot_slo_s", tpot_slo_s)
    rs = [as_result(r) for r in results]
    good = [r for r in rs if r.ok]
    ttfts = [t for t in map(ttft_s, good) if t is not None]
    tpots = [t for t in map(tpot_s, good) if t is not None]
    itls = [g for r in good for g in itl_s(r)]
    lags = [r.start_s - r.arrival_s for r in rs]
    out_tokens = sum(len(r.token_times_s) for r in good)
    summary: dict[str, Any] = {
        "count": len(rs),
        "ok": len(good),
        "failed": len(rs) - len(good),
        "duration_s": duration_s,
        "request_throughput": len(good) / duration_s,
        "output_token_throughput": out_tokens / duration_s,
        "input_tokens": sum(r.prompt_len for r in good),
        "output_tokens": out_tokens,
        **_pcts("ttft", ttfts),
        **_pcts("tpot", tpots),
        **_pcts("itl", itls),
        "send_lag_p99_ms": pct(lags, 99) * 1e3,
        "send_lag_max_ms": max(lags) * 1e3,
        "ttft_slo_s": ttft_slo_s,
        "tpot_slo_s": tpot_slo_s,
        "slo_attainment": (slo_attainment(rs, ttft_slo_s, tpot_slo_s)
                           if ttft_slo_s is not None or tpot_slo_s is not None else None),
    }
    errors = sorted({r.error for r in rs if not r.ok})
    if errors:
        summary["errors"] = errors[:5]  # the distinct first few: enough to see what went wrong
    return summary


# ------------------------------------------------------------------------------------ goodput


def _rate(row: dict) -> float:
    if "rate" not in row:
        raise ValueError(f"a goodput row needs its offered 'rate' (req/s); got keys {sorted(row)}")
    return float(row["rate"])


def _highest(passing: list[float]) -> float | None:
    return max(passing) if passing else None


def goodput_by_attainment(rows: Sequence[dict], ttft_slo_s: float, tpot_slo_s: float,
                          attainment: float = 0.9) -> float | None:
    """Highest offered rate whose fraction of requests meeting both SLOs (failures are misses)
    is >= ``attainment``; None if no rate passes. A row holds ``rate`` and either raw
    ``results`` (RequestResults or their dicts) or a :func:`summarize` summary made with these
    same SLOs (its ``slo_attainment``)."""
    _check_slo("ttft_slo_s", ttft_slo_s)
    _check_slo("tpot_slo_s", tpot_slo_s)
    if not 0 < attainment <= 1:
        raise ValueError(f"attainment must be a fraction in (0, 1], got {attainment!r}")
    passing = []
    for row in rows:
        rate = _rate(row)
        if row.get("results"):
            att = slo_attainment(row["results"], ttft_slo_s, tpot_slo_s)
        elif row.get("slo_attainment") is not None:
            if (row.get("ttft_slo_s"), row.get("tpot_slo_s")) != (ttft_slo_s, tpot_slo_s):
                raise ValueError(
                    f"the row at rate {rate} was summarized with SLOs ttft={row.get('ttft_slo_s')} s, "
                    f"tpot={row.get('tpot_slo_s')} s, not {ttft_slo_s} s, {tpot_slo_s} s; pass its raw "
                    "'results' or summarize it with these SLOs")
            att = row["slo_attainment"]
        else:
            raise ValueError(f"the row at rate {rate} has neither 'results' nor 'slo_attainment'")
        if att >= attainment:
            passing.append(rate)
    return _highest(passing)


def _row_percentiles(row: dict, q: float) -> tuple[float | None, float | None, float]:
    """(TTFT, TPOT) q-th percentiles in seconds over successful requests, and the failed share."""
    if row.get("results"):
        rs = [as_result(r) for r in row["results"]]
        good = [r for r in rs if r.ok]
        ttfts = [t for t in map(ttft_s, good) if t is not None]
        tpots = [t for t in map(tpot_s, good) if t is not None]
        return (pct(ttfts, q) if ttfts else None, pct(tpots, q) if tpots else None,
                1 - len(good) / len(rs))
    keys = (f"ttft_p{q:g}_ms", f"tpot_p{q:g}_ms")
    if not all(k in row for k in keys):
        raise ValueError(f"the row at rate {_rate(row)} has neither 'results' nor {keys[0]} and {keys[1]}")
    failed = row.get("failed", 0) / row["count"] if row.get("count") else 0.0
    to_s = [None if row[k] is None else row[k] / 1e3 for k in keys]
    return to_s[0], to_s[1], failed


def goodput_by_p90(rows: Sequence[dict], ttft_slo_s: float, tpot_slo_s: float,
                   percentile: float = 90) -> float | None:
    """Highest offered rate at which the ``percentile``-th (P90) TTFT <= ``ttft_slo_s`` and P90
    TPOT <= ``tpot_slo_s``; None if no rate passes. Percentiles are over successful requests,
    so a rate also fails when more than ``100 - percentile`` % of its requests failed (else a
    few survivors could pass an overloaded server). A row holds ``rate`` and either raw
    ``results`` or ``ttft_p90_ms`` and ``tpot_p90_ms`` (as :func:`summarize` writes them; with
    ``count``/``failed`` when there were failures). No TTFT sample fails the rate; no TPOT
    sample (every output one token) cannot fail it."""
    _check_slo("ttft_slo_s", ttft_slo_s)
    _check_slo("tpot_slo_s", tpot_slo_s)
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must be in (0, 100), got {percentile!r}")
    passing = []
    for row in rows:
        ttft, tpot, failed = _row_percentiles(row, percentile)
        if (failed <= 1 - percentile / 100 + 1e-12 and ttft is not None and ttft <= ttft_slo_s
                and (tpot is None or tpot <= tpot_slo_s)):
            passing.append(_rate(row))
    return _highest(passing)


def goodput(rate_rows: Sequence[dict], ttft_slo_s: float, tpot_slo_s: float,
            attainment: float = 0.9, percentile: float = 90) -> dict[str, Any]:
    """Both goodput answers for one sweep: ``by_attainment`` (>= ``attainment`` of requests meet
    both SLOs) and ``by_percentile`` (P``percentile`` TTFT and TPOT within their SLOs), each the
    highest measured passing rate in req/s or None, with the SLOs and thresholds used."""
    return {
        "by_attainment": goodput_by_attainment(rate_rows, ttft_slo_s, tpot_slo_s, attainment),
        "by_percentile": goodput_by_p90(rate_rows, ttft_slo_s, tpot_slo_s, percentile),
        "ttft_slo_s": ttft_slo_s,
        "tpot_slo_s": tpot_slo_s,
        "attainment": attainment,
        "percentile": percentile,
    }

