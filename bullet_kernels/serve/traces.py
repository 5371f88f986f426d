"""Request traces for the serving benchmark: what to send, how long, and when.

A trace is a list of :class:`TraceRequest` (prompt length, output length, arrival time in
seconds from the start of the run). Every generator is seeded (``random.Random(seed)``), so two
engines benchmarked with the same seed see the same requests at the same times; lengths and
arrivals come from separate streams of the seed, so a sweep over rates replays the *same*
lengths at every rate and only the spacing changes.

- :func:`uniform_trace`: the project's standard trace: inputs uniform in 512-1536 tokens,
  outputs uniform in 128-384, Poisson arrivals.
- :func:`sglang_random_trace`: the lengths SGLang 0.5.15's own benchmark draws for the command
  in the offline SGLang README (``--dataset-name random-ids --random-input-len 1024
  --random-output-len 256 --random-range-ratio 0.5``): its ``compute_random_lens`` draws
  ``randint(max(int(len * ratio), 1), len + 1)``, so inputs are uniform in 512-1024 and outputs
  in 128-256 tokens (means 768 and 192), not the 512-1536 and 128-384 that README's prose
  says. The reference figures measured with that command (12.8 req/s at P90 TPOT <= 10 ms and
  18.5 at <= 15 ms on the H200) are for these lighter requests: compare with them on this
  trace; our standard trace stays as the prose defines it (a third more work per request).
- :func:`sharegpt_like_trace`, :func:`azure_conversation_trace`: synthetic lengths drawn from
  log-normal distributions fitted to published statistics (no dataset download needed), clipped
  to [4, 4096] input and [4, 2048] output tokens. ``mu = ln(median)``; where a mean is
  published, ``sigma = sqrt(2 ln(mean / median))`` (a log-normal's mean is
  ``exp(mu + sigma^2 / 2)``).

  * ShareGPT, as sampled by the vLLM (``benchmarks/benchmark_serving.py``) and SGLang
    (``bench_serving.py``) benchmarks from ``ShareGPT_V3_unfiltered_cleaned_split.json`` after
    their filtering of conversations: mean input about 256 tokens (median about 180), mean
    output about 215 tokens (median about 150). These are approximate published figures, not
    numbers we measured; the exact values move with the tokenizer and the filter.
  * Azure LLM inference trace 2023, "conversation" (released with Patel et al., "Splitwise:
    Efficient Generative LLM Inference Using Phase Splitting", ISCA 2024): median input about
    1020 tokens, median output about 129 tokens. Only medians are given there, so the spreads
    (sigma 1.0 for inputs, 0.9 for outputs) are our assumption.

- :func:`load_jsonl` / :func:`save_jsonl`: one JSON object per line with ``prompt_len``,
  ``output_len`` and optional ``arrival_s``; lines without arrivals get Poisson arrivals
  (:func:`with_poisson_arrivals`).
- :func:`prompt_ids`: deterministic random token ids of one request's prompt.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Iterable, Sequence

INPUT_CLIP = (4, 4096)
OUTPUT_CLIP = (4, 2048)

# (median, mean) in tokens; see the module docstring for the sources.
SHAREGPT_INPUT = (180.0, 256.0)
SHAREGPT_OUTPUT = (150.0, 215.0)
# (median, sigma): the sigmas are our assumption (the paper gives medians only).
AZURE_CONV_INPUT = (1020.0, 1.0)
AZURE_CONV_OUTPUT = (129.0, 0.9)

JSONL_KEYS = ("prompt_len", "output_len", "arrival_s")
FIRST_TOKEN_ID = 2  # ids 0 and 1 are bos/eos in the shipped tokenizer: never put them in prompts


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: ``prompt_len`` input tokens, ``output_len`` tokens asked for
    (sent with ``ignore_eos`` so exactly that many come back), sent ``arrival_s`` seconds after
    the run starts."""

    prompt_len: int
    output_len: int
    arrival_s: float

    def __post_init__(self):
        for name in ("prompt_len", "output_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TraceRequest.{name} must be an int >= 1, got {v!r}")
        a = self.arrival_s
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a < 0:
            raise ValueError(f"TraceRequest.arrival_s must be a finite number >= 0 (seconds), got {a!r}")


def _check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or math.isnan(rate) or rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s (float('inf') sends everything at time 0), got {rate!r}")
    return float(rate)


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"a trace needs n >= 1 requests, got {n!r}")
    return n


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """``n`` arrival times of a Poisson process at ``rate`` req/s: the first request at 0, then
    exponential gaps of mean ``1 / rate`` (as vLLM's and SGLang's benchmarks send them).
    ``rate=inf`` puts every arrival at 0."""
    _check_n(n)
    rate = _check_rate(rate)
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"poisson-arrivals:{seed}")  # a stream apart from the lengths' stream
    t, out = 0.0, [0.0]
    for _ in range(n - 1):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def with_poisson_arrivals(trace: Sequence[TraceRequest], rate: float, seed: int = 0) -> list[TraceRequest]:
    """The same requests (same lengths, same order) with Poisson arrivals at ``rate`` req/s."""
    if not trace:
        raise ValueError("with_poisson_arrivals: the trace is empty; give at least one request")
    times = poisson_arrivals(len(trace), rate, seed)
    return [dataclasses.replace(r, arrival_s=t) for r, t in zip(trace, times)]


def _check_range(name: str, rng: tuple[int, int]) -> tuple[int, int]:
    lo, hi = rng
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
        raise ValueError(f"{name} must be (low, high) ints with 1 <= low <= high, got {rng!r}")
    return lo, hi


def uniform_trace(n: int, rate: float, input_range: tuple[int, int] = (512, 1536),
                  output_range: tuple[int, int] = (128, 384), seed: int = 0) -> list[TraceRequest]:
    """The project's standard trace: prompt and output lengths uniform over the inclusive
    ranges, Poisson arrivals at ``rate`` req/s (``inf``: all at time 0)."""
    _check_n(n)
    ilo, ihi = _check_range("input_range", input_range)
    olo, ohi = _check_range("output_range", output_range)
    rng = random.Random(seed)
    lengths = [(rng.randint(ilo, ihi), rng.randint(olo, ohi)) for _ in range(n)]
    times = poisson_arrivals(n, rate, seed)
    return [TraceRequest(p, o, t) for (p, o), t in zip(lengths, times)]


SGLANG_RANDOM_INPUT = (512, 1024)  # SGLang's random-ids at input 1024, output 256, range ratio 0.5
SGLANG_RANDOM_OUTPUT = (128, 256)


def sglang_random_trace(n: int, rate: float, seed: int = 0) -> list[TraceRequest]:
    """The lengths of SGLang's ``bench_serving --dataset-name random-ids --random-input-len 1024
    --random-output-len 256 --random-range-ratio 0.5`` (module docstring), Poisson arrivals."""
    return uniform_trace(n, rate, SGLANG_RANDOM_INPUT, SGLANG_RANDOM_OUTPUT, seed)


def lognormal_sigma(median: float, mean: float) -> float:
    """The sigma of a log-normal with this median and mean: ``sqrt(2 ln(mean / median))``."""
    if not 0 < median < mean:
        raise ValueError(f"a log-normal fit needs 0 < median < mean, got median={median}, mean={mean}")
    return math.sqrt(2 * math.log(mean / median))


def _lognormal_trace(n: int, rate: float, seed: int, inp: tuple[float, float],
                     out: tuple[float, float]) -> list[TraceRequest]:
    """Lengths ``clip(round(lognormal(mu, sigma)))`` for input and output; (median, sigma) pairs."""
    _check_n(n)
    rng = random.Random(seed)

    def draw(median: float, sigma: float, clip: tuple[int, int]) -> int:
        return min(max(round(rng.lognormvariate(math.log(median), sigma)), clip[0]), clip[1])

    lengths = [(draw(*inp, INPUT_CLIP), draw(*out, OUTPUT_CLIP)) for _ in range(n)]
    times = poisson_arrivals(n, rate, seed)
    return [TraceRequest(p, o, t) for (p, o), t in zip(lengths, times)]


def sharegpt_like_trace(n: int, rate: float, seed: int = 0) -> list[TraceRequest]:
    """Lengths shaped like ShareGPT as the vLLM/SGLang benchmarks sample it (module docstring:
    input median ~180 / mean ~256, output median ~150 / mean ~215 tokens), Poisson arrivals."""
    inp = (SHAREGPT_INPUT[0], lognormal_sigma(*SHAREGPT_INPUT))
    out = (SHAREGPT_OUTPUT[0], lognormal_sigma(*SHAREGPT_OUTPUT))
    return _lognormal_trace(n, rate, seed, inp, out)


def azure_conversation_trace(n: int, rate: float, seed: int = 0) -> list[TraceRequest]:
    """Lengths shaped like the Azure 2023 conversation trace (median input ~1020, output ~129
    tokens; sigmas 1.0 and 0.9 assumed), Poisson arrivals."""
    return _lognormal_trace(n, rate, seed, AZURE_CONV_INPUT, AZURE_CONV_OUTPUT)


# ------------------------------------------------------------------------------------- JSONL


def _parse_line(text: str, where: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object "
                         f"with keys {', '.join(JSONL_KEYS)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(JSONL_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(JSONL_KEYS)}")
    missing = [k for k in ("prompt_len", "output_len") if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}; prompt_len and output_len are required")
    return obj


def load_jsonl(path: str | Path, rate: float | None = None, seed: int = 0) -> list[TraceRequest]:
    """Read a JSONL trace (blank lines skipped). With ``rate``, arrivals are (re)drawn as a
    Poisson process at that rate, ignoring any ``arrival_s`` in the file; without it every line
    must carry ``arrival_s``. A malformed line raises ``ValueError`` naming its line number."""
    path = Path(path)
    rows: list[tuple[dict, str]] = []
    with path.open() as f:
        for lineno, text in enumerate(f, 1):
            if text.strip():
                where = f"{path}:{lineno}"
                rows.append((_parse_line(text, where), where))
    if not rows:
        raise ValueError(f"{path}: no requests; a trace needs at least one JSON line")
    if rate is None:
        for obj, where in rows:
            if "arrival_s" not in obj:
                raise ValueError(f"{where}: no arrival_s; give every line an arrival_s or pass rate= "
                                 "to draw Poisson arrivals")
    trace = []
    for obj, where in rows:
        try:
            trace.append(TraceRequest(obj["prompt_len"], obj["output_len"],
                                      obj.get("arrival_s", 0.0) if rate is None else 0.0))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return trace if rate is None else with_poisson_arrivals(trace, rate, seed)


def save_jsonl(trace: Iterable[TraceRequest], path: str | Path) -> Path:
    """Write ``trace`` as JSONL (one object per request, arrivals included); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in trace:
            f.write(json.dumps(dataclasses.asdict(r)) + "\n")
    return path


# ----------------------------------------------------------------------------------- prompts


def prompt_ids(request: TraceRequest, vocab_size: int, seed: int, index: int) -> list[int]:
    """Token ids of request ``index``'s prompt: uniform over ``[2, vocab_size)`` (never the
    bos/eos ids 0 and 1), a pure function of ``(seed, index, prompt_len)`` so every engine and
    every rate of a sweep sees the same prompts. Random ids defeat prefix caching, as intended:
    the benchmark measures prefill, not cache hits."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= FIRST_TOKEN_ID:
        raise ValueError(f"vocab_size must be an int > {FIRST_TOKEN_ID} (ids 0 and 1 are reserved), got {vocab_size!r}")
    rng = random.Random(f"prompt:{seed}:{index}")
    return [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(request.prompt_len)]
