"""Simulated serving: the bullet scheduler's timeline from the latency estimator (no GPU).

What a policy would do to TTFT, TPOT and goodput, before a GPU is spent on it. The simulation
follows :class:`~.scheduler.Scheduler` in bullet mode at the level of whole steps:

- requests arrive on the trace's times and queue (FIFO);
- while no prefill is in progress, the queue's head prompts (up to ``max_prefill_tokens``, at
  least one, within ``max_running``) start one, run as the profile's layer groups on the prefill
  lane;
- the decode lane runs one step after another over the running batch; before each step the
  policy chooses the split from (batch, longest context) and (prefill tokens, groups left). Mid-
  prefill the split is kept unless the new one gives decode more SMs (as the scheduler does);
- a step costs the estimator's decode time on its lane, times the co-run slowdown while a
  prefill runs beside it, plus ``step_overhead_ms`` of host time (5.9 ms of wall time against
  5.4 ms of graph for a batch-16 step on the H200, docs/serving.md); the prefill lane advances
  through its groups in the meantime at their estimated (co-run) times on its lane;
- with nothing to decode, a prefill runs alone on the whole GPU;
- a prefill that lands during a step joins the batch at that step's end: its first token
  appears then (TTFT), and each later step end adds one token to every running request.

Left out, so the results are an estimate: the host's own pace (the simulation has no Python
loop), queued layer groups that delay a change of split, the KV cache's capacity (enough pages
are assumed) and the whole GPU's prefill of several prompts at the scale the profile did not
measure (the estimator extrapolates in tokens). Results are labelled simulated wherever they are
written.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Sequence

from ..orchestrate.policy import DECODE, PREFILL, Policy, split_chooser
from .metrics import RequestResult, summarize
from .traces import TraceRequest

DEFAULT_STEP_OVERHEAD_MS = 0.5


@dataclasses.dataclass
class _Running:
    index: int
    context: int
    left: int  # tokens still to generate
    times: list[float]


@dataclasses.dataclass(frozen=True)
class SimConfig:
    max_prefill_tokens: int = 8192
    max_running: int = 128
    step_overhead_ms: float = DEFAULT_STEP_OVERHEAD_MS

    def __post_init__(self):
        for name in ("max_prefill_tokens", "max_running"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not self.step_overhead_ms >= 0:
            raise ValueError(f"step_overhead_ms must be >= 0, got {self.step_overhead_ms}")


class BulletSimulation:
    """One run of a trace through the bullet scheduler's timeline (module docstring)."""

    def __init__(self, policy: Policy, cfg: SimConfig | None = None):
        self.policy, self.cfg = policy, cfg or SimConfig()
        self.est = policy.estimator
        self.groups = len(self.est.groups)
        self.whole = self.est.sm_count
        self._choose = split_chooser(policy)  # the server's decisions (serve/app.py), cached alike
        self._decode_ms = functools.lru_cache(maxsize=None)(self._decode_ms_uncached)
        self._group_ms = functools.lru_cache(maxsize=None)(self._group_ms_uncached)

    def _decode_ms_uncached(self, batch: int, context: int, split, corun: bool) -> float:
        sms = split[DECODE] if split is not None else self.whole
        alone = self.est.decode_ms(batch, context, sms)
        return (self.est.corun(alone, DECODE, sms).ms if corun and split is not None else alone.ms)

    def _group_ms_uncached(self, tokens: int, group: int, split, corun: bool) -> float:
        sms = split[PREFILL] if split is not None else self.whole
        ms = self.est.prefill_group_ms(tokens, self.est.groups[group], sms).ms
        if corun and split is not None:
            ms *= self.est.slowdown(PREFILL, split[DECODE])[0]
        return ms

    def run(self, trace: Sequence[TraceRequest]) -> list[RequestResult]:
        cfg = self.cfg
        arrivals = collections.deque(sorted(range(len(trace)), key=lambda i: trace[i].arrival_s))
        waiting: collections.deque[int] = collections.deque()
        running: list[_Running] = []
        done: dict[int, list[float]] = {}  # request -> its token times (ms)
        prefill: list[int] = []  # requests of the prefill in progress
        group, group_left_ms, split = 0, 0.0, None
        t = 0.0  # ms

        def arrive(until: float) -> None:
            while arrivals and trace[arrivals[0]].arrival_s * 1e3 <= until:
                waiting.append(arrivals.popleft())

        while arrivals or waiting or running or prefill:
            arrive(t)
            if not running and not prefill and not waiting:
                t = trace[arrivals[0]].arrival_s * 1e3  # idle until the next arrival
                continue
            if not prefill and waiting:
                tokens = 0
                while waiting and len(running) + len(prefill) < cfg.max_running and (
                        not prefill or tokens + trace[waiting[0]].prompt_len <= cfg.max_prefill_tokens):
                    i = waiting.popleft()
                    prefill.append(i)
                    tokens += trace[i].prompt_len
                group, group_left_ms = 0, 0.0
            tokens = sum(trace[i].prompt_len for i in prefill)
            decode = (len(running), max(r.context for r in running)) if running else None
            if decode is None:  # the prefill alone on the whole GPU, to its end
                split = None  # `group` counts the groups started; the current one has group_left_ms to go
                t += group_left_ms + sum(self._group_ms(tokens, g, None, False) for g in range(group, self.groups))
                running += self._join(prefill, trace, t, done)
                prefill = []
                continue
            chosen = self._choose(*decode, tokens if prefill else None, self.groups - group if prefill else 0)
            if not (prefill and group > 0 and split is not None and chosen is not None
                    and chosen[DECODE] <= split[DECODE]):
                split = chosen
            step = self._decode_ms(*decode, split, corun=bool(prefill)) + cfg.step_overhead_ms
            landed = False
            if prefill:  # the prefill lane advances through its groups during the step
                budget = step
                while budget > 0 and not landed:
                    if group_left_ms <= 0:
                        if group == self.groups:
                            landed = True
                            break
                        group_left_ms = self._group_ms(tokens, group, split, corun=True)
                        group += 1
                    used = min(budget, group_left_ms)
                    budget -= used
                    group_left_ms -= used
                    if group_left_ms <= 0 and group == self.groups:
                        landed = True
            t += step
            for r in running:
                r.times.append(t)
                r.left -= 1
                r.context += 1
            for r in [r for r in running if r.left <= 0]:
                done[r.index] = r.times
            running = [r for r in running if r.left > 0]
            if landed:
                running += self._join(prefill, trace, t, done)
                prefill, group, group_left_ms = [], 0, 0.0
        for r in running:
            done[r.index] = r.times
        return [RequestResult(prompt_len=req.prompt_len, output_len=req.output_len, arrival_s=req.arrival_s,
                              start_s=req.arrival_s, first_token_s=done[i][0] / 1e3,
                              token_times_s=[x / 1e3 for x in done[i]], end_s=done[i][-1] / 1e3)
                for i, req in enumerate(trace)]

    @staticmethod
    def _join(prefill: list[int], trace, t: float, done: dict) -> list[_Running]:
        """The prompts of a prefill that landed at ``t``: their first token now; those asking
        for more go on decoding."""
        joined = []
        for i in prefill:
            req = trace[i]
            if req.output_len <= 1:
                done[i] = [t]
            else:
                joined.append(_Running(i, req.prompt_len + 1, req.output_len - 1, [t]))
        return joined


def simulate_rates(policy: Policy, make_trace, rates: Sequence[float], ttft_slo_s: float, tpot_slo_s: float,
                   cfg: SimConfig | None = None, progress=None) -> list[dict]:
    """One row per rate in the shape of :func:`.loadgen.sweep`'s (``results`` kept), marked
    ``simulated``; ``progress(row)`` after each rate."""
    sim = BulletSimulation(policy, cfg)
    rows = []
    for rate in rates:
        results = sim.run(make_trace(rate))
        duration = max(r.end_s for r in results) - min(r.arrival_s for r in results)
        row = {"rate": rate, "n": len(results), **summarize(results, max(duration, 1e-9), ttft_slo_s, tpot_slo_s)}
        row["simulated"] = True
        row["send_lag_p99_ms"] = None
        row["results"] = [{k: round(v, 6) if isinstance(v, float) else v for k, v in dataclasses.asdict(r).items()}
                          for r in results]
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows
