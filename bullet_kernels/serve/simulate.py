"""Simulated serving: the bullet scheduler's timeline from the latency estimator (no GPU).

(Also the prefill-first baseline, ``mode="sequential"``: prompts prefilled on the whole GPU
whenever they wait, decode steps on the whole GPU otherwise; and chunked prefill,
``mode="chunked"``, whose fused steps the profile does not measure: a fused step of ``c``
prompt tokens beside ``r`` decode rows costs the whole GPU's prefill of ``c`` tokens (at least
the weights' read, the profile's smallest decode step) plus the decode step of the ``r`` rows,
as if one ran after the other. That is what was measured on the H200: a fused step of 432
prompt tokens and 80-96 decode rows took 19 ms, and the profile gives 9.6 + 9.4 ms; a cheaper
model (one prefill of ``c + r`` tokens plus only the decode rows' attention) put every chunk
size's P90 TPOT 15-35% below the measured runs (docs/serving.md). ``SimConfig.fuse_prompt_tokens``
runs bullet mode with short prompts fused that way, as the scheduler's option of that name does.)

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
  through its groups in the meantime at their estimated (co-run) times on its lane, but only
  through the groups the scheduler has queued on it (``prefill_ahead``, topped up once a step:
  a short prompt's groups, each far shorter than a step, leave the lane idle until the next);
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
from ..orchestrate.profile import WHOLE_GPU
from .app import GPU_PREFILL_BUCKETS
from .metrics import RequestResult, summarize
from .request import DEFAULT_CHUNK_SIZE, PREFILL_AHEAD
from .traces import TraceRequest

DEFAULT_STEP_OVERHEAD_MS = 0.5


@dataclasses.dataclass
class _Running:
    index: int
    context: int
    left: int  # tokens still to generate
    times: list[float]


@dataclasses.dataclass
class _Prefill:
    """A prefill in progress (``tokens``: its graph's token bucket): ``group`` layer groups
    started, the last with ``group_left_ms`` to go."""

    requests: list[int]
    tokens: int
    group: int = 0
    group_left_ms: float = 0.0

    def left_ms(self, group_ms, groups: int) -> float:
        """Its time to the end, each group taking ``group_ms(g)``."""
        return self.group_left_ms + sum(group_ms(g) for g in range(self.group, groups))

    def advance(self, budget_ms: float, group_ms, groups: int, ahead: int | None = None) -> bool:
        """Run ``budget_ms`` of it (groups at ``group_ms(g)`` each); whether it landed. With
        ``ahead``, only as many groups as the scheduler keeps queued on the lane run: the one
        under way and new ones up to ``ahead`` in all (it tops the queue up once a step)."""
        started = 1 if self.group_left_ms > 0 else 0
        while True:
            if self.group_left_ms <= 0:
                if self.group == groups:
                    return True
                if ahead is not None and started >= ahead:
                    return False  # the lane waits for the next step to queue more
                self.group_left_ms = group_ms(self.group)
                self.group += 1
                started += 1
            used = min(budget_ms, self.group_left_ms)
            budget_ms -= used
            self.group_left_ms -= used
            if self.group_left_ms <= 0 and self.group == groups:
                return True
            if budget_ms <= 0:
                return False


class _Queue:
    """The trace's requests in arrival order; :meth:`arrive` moves those that have arrived by
    the simulated time into ``waiting`` (FIFO)."""

    def __init__(self, trace: Sequence[TraceRequest]):
        self._trace = trace
        self._pending = collections.deque(sorted(range(len(trace)), key=lambda i: trace[i].arrival_s))
        self.waiting: collections.deque[int] = collections.deque()

    def arrive(self, t_ms: float) -> None:
        while self._pending and self._trace[self._pending[0]].arrival_s * 1e3 <= t_ms:
            self.waiting.append(self._pending.popleft())

    def more(self) -> bool:
        """Requests still to arrive?"""
        return bool(self._pending)

    def next_ms(self) -> float:
        """When the next request arrives (ms): where an idle GPU's clock jumps to."""
        return self._trace[self._pending[0]].arrival_s * 1e3


def _decode_step(running: list[_Running], t: float, done: dict) -> list[_Running]:
    """A decode step ending at ``t``: one token to every running request; those that are
    complete leave (their token times into ``done``)."""
    for r in running:
        r.times.append(t)
        r.left -= 1
        r.context += 1
        if r.left <= 0:
            done[r.index] = r.times
    return [r for r in running if r.left > 0]


@dataclasses.dataclass(frozen=True)
class SimConfig:
    max_prefill_tokens: int = 8192
    max_running: int = 128
    step_overhead_ms: float = DEFAULT_STEP_OVERHEAD_MS
    # The server replays a prefill's graph of the smallest token bucket that holds it
    # (serve/app.py's buckets); with pad_prefill a prefill costs its bucket's time. Off by
    # default: without it the simulation reproduced the measured bullet goodputs at every
    # target, with it they came out one rate step low (docs/serving.md).
    pad_prefill: bool = False
    prefill_buckets: tuple[int, ...] = GPU_PREFILL_BUCKETS
    chunk_size: int = DEFAULT_CHUNK_SIZE  # chunked, and bullet's fused steps: tokens a fused step, decode rows included
    # bullet: layer groups the scheduler keeps queued on the prefill lane, topped up once a step
    # (SchedulerConfig.prefill_ahead); None: the lane never waits for the next step
    prefill_ahead: int | None = PREFILL_AHEAD
    fuse_prompt_tokens: int = 0  # bullet: prompts at most this long fused into decode steps (0: none)

    def padded(self, tokens: int) -> int:
        if not self.pad_prefill:
            return tokens
        return next((b for b in self.prefill_buckets if b >= tokens), tokens)

    def __post_init__(self):
        if isinstance(self.fuse_prompt_tokens, bool) or not isinstance(self.fuse_prompt_tokens, int) \
                or self.fuse_prompt_tokens < 0:
            raise ValueError(f"fuse_prompt_tokens must be an int >= 0, got {self.fuse_prompt_tokens!r}")
        a = self.prefill_ahead
        if a is not None and (isinstance(a, bool) or not isinstance(a, int) or a < 1):
            raise ValueError(f"prefill_ahead must be None (the lane never waits) or an int >= 1, got {a!r}")
        for name in ("max_prefill_tokens", "max_running", "chunk_size"):
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
        # the server's decisions (serve/app.py), cached alike; a policy in average TPOT mode decides
        # from the share of co-running steps it is fed (each step here), so not cached
        self._share = getattr(policy, "corun_share", None)
        self._choose = split_chooser(policy, cached=getattr(policy, "tpot_mode", "step") == "step")
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

    def _mixed_ms(self, chunk_tokens: int, rows: int, context: int) -> float:
        """A fused step on the whole GPU (module docstring): its chunk's prefill (at least the
        weights' read) and its decode rows' step, one after the other."""
        ms = max(self.est.prefill_ms(chunk_tokens, self.whole).ms, self._weights_ms) if chunk_tokens else 0.0
        return ms + (self._decode_ms(rows, context, None, False) if rows else 0.0)

    @functools.cached_property
    def _weights_ms(self) -> float:
        """The profile's smallest decode step on the whole GPU: about the weights' read."""
        points = [p for p in self.est.profile.decode if p["split"] == WHOLE_GPU]
        smallest = min(points, key=lambda p: (p["batch"], p["context"]))
        return self._decode_ms(smallest["batch"], smallest["context"], None, False)

    def _fused_step(self, running: list[_Running], fusing: dict, waiting: collections.deque, trace,
                    t: float, done: dict, limit: int | None) -> tuple[float, list[_Running]]:
        """One fused step (chunked mode, or bullet's short prompts): the running batch's decode
        rows and chunks of the prompts in progress (``fusing``: request -> tokens computed), then
        of new ones from the queue (at most ``limit`` tokens long, where given), ``chunk_size``
        tokens in all. Returns the time at its end and the running batch after it."""
        rows = len(running)
        room = self.cfg.chunk_size - rows
        ran: list[tuple[int, int]] = []
        for i in list(fusing):
            if room <= 0:
                break
            part = min(room, trace[i].prompt_len - fusing[i])
            ran.append((i, part))
            room -= part
        while room > 0 and waiting and rows + len(fusing) < self.cfg.max_running and (
                limit is None or trace[waiting[0]].prompt_len <= limit):
            i = waiting.popleft()
            fusing[i] = 0
            part = min(room, trace[i].prompt_len)
            ran.append((i, part))
            room -= part
        chunk = sum(part for _, part in ran)
        context = max((r.context for r in running), default=0)
        step = (self._mixed_ms(chunk, rows, context) if chunk else self._decode_ms(rows, context, None, False))
        t += step + self.cfg.step_overhead_ms
        running = _decode_step(running, t, done)
        complete = []
        for i, part in ran:
            fusing[i] += part
            if fusing[i] == trace[i].prompt_len:
                del fusing[i]
                complete.append(i)
        return t, running + self._join(complete, trace, t, done)

    def run_chunked(self, trace: Sequence[TraceRequest]) -> list[RequestResult]:
        """Chunked prefill (``bullet serve --mode chunked``): every step a fused one on the whole
        GPU while prompts wait or are in progress, a decode step otherwise."""
        queue = _Queue(trace)
        waiting = queue.waiting
        running: list[_Running] = []
        fusing: dict[int, int] = {}
        done: dict[int, list[float]] = {}
        t = 0.0
        while queue.more() or waiting or running or fusing:
            queue.arrive(t)
            if not running and not waiting and not fusing:
                t = queue.next_ms()
                continue
            t, running = self._fused_step(running, fusing, waiting, trace, t, done, None)
        return self._results(trace, done)

    def _fuses(self, fusing: dict, waiting: collections.deque, trace, running: list) -> bool:
        """bullet with fuse_prompt_tokens, no prefill on the lane: is the next step a fused one?"""
        limit = self.cfg.fuse_prompt_tokens
        if not limit:
            return False
        if fusing:
            return True
        room = len(running) < min(self.cfg.chunk_size, self.cfg.max_running)
        return room and bool(waiting) and trace[waiting[0]].prompt_len <= limit

    def run(self, trace: Sequence[TraceRequest]) -> list[RequestResult]:
        cfg = self.cfg
        fusing: dict[int, int] = {}  # fuse_prompt_tokens: short prompts in progress -> tokens done
        queue = _Queue(trace)
        waiting = queue.waiting
        running: list[_Running] = []
        done: dict[int, list[float]] = {}  # request -> its token times (ms)
        prefill: _Prefill | None = None
        split = None
        t = 0.0  # ms
        if self._share is not None:
            self._share.clear()  # a run starts with no history
        while queue.more() or waiting or running or prefill or fusing:
            queue.arrive(t)
            if not running and not prefill and not waiting and not fusing:
                t = queue.next_ms()  # idle until the next arrival
                continue
            if prefill is None and self._fuses(fusing, waiting, trace, running):
                split = None  # a fused step runs on the whole GPU
                t, running = self._fused_step(running, fusing, waiting, trace, t, done, cfg.fuse_prompt_tokens)
                continue
            if prefill is None and waiting:  # None when the decode batch is full: nothing admitted
                prefill = self._admit(waiting, trace, len(running))
            if not running:  # the prefill alone on the whole GPU, to its end
                split = None
                t += prefill.left_ms(lambda g: self._group_ms(prefill.tokens, g, None, False), self.groups)
                running += self._join(prefill.requests, trace, t, done)
                prefill = None
                continue
            decode = (len(running), max(r.context for r in running))
            chosen = self._choose(*decode, prefill and prefill.tokens, self.groups - prefill.group if prefill else 0)
            if not (prefill and prefill.group > 0 and split is not None and chosen is not None
                    and chosen[DECODE] <= split[DECODE]):  # mid-prefill, decode never gets fewer SMs
                split = chosen
            step = self._decode_ms(*decode, split, corun=prefill is not None) + cfg.step_overhead_ms
            if self._share is not None:
                self._share.observe(prefill is not None)
            landed = prefill is not None and prefill.advance(
                step, lambda g: self._group_ms(prefill.tokens, g, split, True), self.groups, cfg.prefill_ahead)
            t += step
            running = _decode_step(running, t, done)
            if landed:
                running += self._join(prefill.requests, trace, t, done)
                prefill = None
        return self._results(trace, done)

    def run_sequential(self, trace: Sequence[TraceRequest]) -> list[RequestResult]:
        """The prefill-first baseline (``bullet serve --mode sequential``) on the same model:
        whenever prompts wait, they are prefilled on the whole GPU while decode waits; otherwise
        one decode step of the running batch on the whole GPU."""
        queue = _Queue(trace)
        waiting = queue.waiting
        running: list[_Running] = []
        done: dict[int, list[float]] = {}
        t = 0.0
        while queue.more() or waiting or running:
            queue.arrive(t)
            if not running and not waiting:
                t = queue.next_ms()
                continue
            if waiting and len(running) < self.cfg.max_running:
                prefill = self._admit(waiting, trace, len(running))
                t += prefill.left_ms(lambda g: self._group_ms(prefill.tokens, g, None, False), self.groups)
                t += self.cfg.step_overhead_ms
                running += self._join(prefill.requests, trace, t, done)
                continue
            t += self._decode_ms(len(running), max(r.context for r in running), None, False) + self.cfg.step_overhead_ms
            running = _decode_step(running, t, done)
        return self._results(trace, done)

    @staticmethod
    def _results(trace: Sequence[TraceRequest], done: dict) -> list[RequestResult]:
        return [RequestResult(prompt_len=req.prompt_len, output_len=req.output_len, arrival_s=req.arrival_s,
                              start_s=req.arrival_s, first_token_s=done[i][0] / 1e3,
                              token_times_s=[x / 1e3 for x in done[i]], end_s=done[i][-1] / 1e3)
                for i, req in enumerate(trace)]

    def _admit(self, waiting: collections.deque, trace, running: int) -> _Prefill | None:
        """The queue's head prompts for one prefill: at least one, up to max_prefill_tokens,
        within max_running; None when the decode batch has no room (as the scheduler admits
        nothing then)."""
        chosen, tokens = [], 0
        while waiting and running + len(chosen) < self.cfg.max_running and (
                not chosen or tokens + trace[waiting[0]].prompt_len <= self.cfg.max_prefill_tokens):
            i = waiting.popleft()
            chosen.append(i)
            tokens += trace[i].prompt_len
        return _Prefill(chosen, self.cfg.padded(tokens)) if chosen else None

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


MODES = ("bullet", "sequential", "chunked")


def simulate_rates(policy: Policy, make_trace, rates: Sequence[float], ttft_slo_s: float, tpot_slo_s: float,
                   cfg: SimConfig | None = None, progress=None, mode: str = "bullet") -> list[dict]:
    """One row per rate in the shape of :func:`.loadgen.sweep`'s (``results`` kept), marked
    ``simulated``; ``progress(row)`` after each rate."""
    if mode not in MODES:
        raise ValueError(f"a simulation runs one of the modes {', '.join(MODES)}, got {mode!r}")
    sim = BulletSimulation(policy, cfg)
    run = {"bullet": sim.run, "sequential": sim.run_sequential, "chunked": sim.run_chunked}[mode]
    rows = []
    for rate in rates:
        results = run(make_trace(rate))
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
