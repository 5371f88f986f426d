"""Continuous batching over a :class:`~bullet_kernels.engine.ModelRunner`, in three modes.

Every :meth:`Scheduler.step` runs one engine iteration and returns what each request got.

- ``sequential`` (prefill-first): a waiting request that fits is prefilled (several at once up
  to ``max_prefill_tokens``) before the running batch takes its next decode step.
- ``chunked`` (Sarathi-style): each step is one fused forward of the running batch's decode
  tokens and chunks of waiting prompts in order, ``chunk_size`` tokens in all; a prompt joins the
  decode batch after its last chunk.
- ``bullet``: prefill and decode are two lanes. Each step launches the decode batch's next step
  on the decode lane and the next layer groups of the prompts being prefilled (every waiting
  prompt that fits one prefill) on the prefill lane, at the same time: on a GPU with a split
  policy each on its lane's SMs, the split chosen per step, and up to ``prefill_ahead`` groups kept
  queued on the prefill lane. A prompt joins the decode batch once its last layer group is done,
  so its KV is complete first. Without a GPU the launches run one after the other. With
  ``fuse_prompt_tokens`` set, prompts at most that long skip the prefill lane: while no prefill
  is on the lane they are prefilled as in ``chunked``, fused into decode steps on the whole GPU.

Admission takes a waiting request when the KV cache has pages for its prompt (plus one page per
running request of headroom) and the decode batch has room (``max_running`` counts the prompts
being prefilled too). When the cache runs out mid-generation, the newest running
requests are **preempted**: their KV is freed and they go back to the front of the queue with
the tokens made so far, which are recomputed on readmission (nothing is lost). A request that
could never fit (longer than the context, or than the whole cache) is refused when added.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import zlib
from typing import Callable, Sequence

import torch

from ..engine import KVCacheExhausted, Placement
from ..engine.placement import WHOLE_GPU
from ..errors import BulletError
from .request import DEFAULT_CHUNK_SIZE, MODES, PREFILL_AHEAD, BadRequest, Request, State






class QueueFull(BulletError):
    """The waiting queue is at ``max_waiting`` (the server answers 429)."""


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    mode: str = "bullet"
    chunk_size: int = DEFAULT_CHUNK_SIZE  # chunked: tokens per fused step, decode rows included
    max_running: int = 128  # decode batch size cap
    max_waiting: int = 1024  # queued requests before add() refuses (overload)
    max_prefill_tokens: int = 8192  # sequential: prompt tokens prefilled in one step
    eos_token_ids: tuple[int, ...] = ()  # the model's end-of-sequence ids (ignore_eos skips them)
    # Overlap the host's work for decode step N+1 with the GPU running step N (greedy batches):
    # step N's tokens stay on the GPU and feed step N+1's input ids there. `bullet serve` turns
    # it on (on the H200 a batch-16 decode step took 5.9 ms of wall time with it, 6.8 without:
    # docs/serving.md); off here, so a caller stepping the scheduler gets each step's tokens in
    # the step that computed them.
    overlap: bool = False
    # bullet: prompts of at most this many tokens (0: none) are prefilled in chunks fused into the
    # decode steps on the whole GPU, as chunked mode does, instead of on the prefill lane. A short
    # prompt costs a fused step little while a split takes SMs from the decode batch: on the
    # H200's ShareGPT-like trace (prompts of a few hundred tokens) chunked prefill served 30 req/s
    # within P90 TPOT 10 ms against 18 for bullet with its 15 ms policy (its 10 ms policy was not
    # run there; docs/serving.md). Not measured on a GPU yet.
    fuse_prompt_tokens: int = 0
    # bullet: layer groups kept queued on the prefill lane, topped up once a step. More lets a
    # short prompt's groups (each far shorter than a decode step) run back to back instead of
    # idling the lane until the next step; fewer lets a change of split wait for less. Simulated
    # on the chat trace (docs/serving.md): 12 req/s within P90 TPOT 10 ms with 2, 24 with 4, 30
    # with 8 (every group); no change on the uniform trace. Not measured on a GPU yet.
    prefill_ahead: int = PREFILL_AHEAD

    def __post_init__(self):
        if not isinstance(self.overlap, bool):
            raise ValueError(f"overlap must be True or False, got {self.overlap!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        f = self.fuse_prompt_tokens
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise ValueError(f"fuse_prompt_tokens must be an integer >= 0 (0: off), got {f!r}")
        if f and self.mode != "bullet":
            raise ValueError(f"fuse_prompt_tokens applies to mode bullet (the others have no prefill lane to "
                             f"skip); got mode {self.mode!r} with fuse_prompt_tokens {f}")
        for name in ("chunk_size", "max_running", "max_waiting", "max_prefill_tokens", "prefill_ahead"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


@dataclasses.dataclass
class Event:
    """What one step produced for one request. ``num_output`` is the request's output length
    after this event (the request object keeps changing on the loop thread)."""

    request: Request
    new_tokens: list[int]
    finished: bool
    num_output: int = 0


@dataclasses.dataclass(eq=False)
class DecodeFlight:
    """A decode step launched but not yet read back (overlap mode). ``tokens`` (on the GPU) feed
    the next step's input ids; ``host`` receives them without blocking, ``done`` marks that copy.
    ``held``: KV pages of requests finished while this step may still write them, freed once it
    is done."""

    batch: list[Request]
    row_of: dict[int, int]  # id(request) -> row
    tokens: torch.Tensor
    host: torch.Tensor
    done: object | None  # torch.cuda.Event; None on the CPU (already done)
    held: list[list[int]] = dataclasses.field(default_factory=list)
    fused: bool = False  # a fused (chunk + decode rows) step left in flight, counted as a mixed step


# ``placements(decode_work, prefill_work) -> (decode placement, prefill placement)``; the work is
# ``(batch, context)`` / ``(tokens, groups left)`` or None. Default: the whole GPU for both.
PlacementFn = Callable[[tuple | None, tuple | None], tuple[Placement, Placement]]


def whole_gpu(decode, prefill) -> tuple[Placement, Placement]:
    return WHOLE_GPU, WHOLE_GPU


class Scheduler:
    def __init__(self, runner, cfg: SchedulerConfig | None = None, placements: PlacementFn = whole_gpu):
        self.runner, self.cfg, self.placements = runner, cfg or SchedulerConfig(), placements
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        # Admitted prompts whose KV is not complete yet: chunked, partly computed, in order;
        # bullet and sequential, the prompts of the prefill in flight. Held here (not in locals)
        # until they join the decode batch, so fail_all() always finds them.
        self.prefilling: list[Request] = []
        self._prefill_step = None  # bullet: the prepared prefill step and its next layer group
        self._prefill_group = 0
        self._split = None  # the split of the last bullet step (None: whole GPU)
        self._placed = (WHOLE_GPU, WHOLE_GPU)  # bullet: the last step's (decode, prefill) placements
        self._inflight: list = []  # bullet: events of the prefill layer groups queued on the GPU
        self._prefill_logits = None  # bullet: the prefill's logits, once its last group is launched
        self._prefill_done = None  # bullet: the event after its last group (GPU)
        self._flight: DecodeFlight | None = None  # overlap: the newest decode step launched
        self._unread: list[DecodeFlight] = []  # overlap: launched and not yet read (the newest last)
        # Every event the current step has made. A step that raises has finished some requests
        # (and handed out tokens) already; its return value is lost, so fail_all() returns these.
        self._step_events: list[Event] = []
        self.counters: collections.Counter[str] = collections.Counter()
        self.last_split: dict[str, int] = {}  # lane -> SMs of the last step (for /metrics)
        cuda = runner.device.type == "cuda"
        self._streams = {"prefill": torch.cuda.Stream(runner.device), "decode": torch.cuda.Stream(runner.device)} if cuda else {}

    # -- admission -------------------------------------------------------------------------------

    def check(self, req: Request) -> None:
        """Refuse, with the reason, a request that can never be served."""
        if not req.prompt:
            raise BadRequest("the prompt is empty: give at least one token")
        vocab = self.runner.model.config.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) for t in req.prompt):
            raise BadRequest(f"token ids must be integers, got {[t for t in req.prompt if not isinstance(t, int) or isinstance(t, bool)][:4]}")
        bad = [t for t in req.prompt if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"token ids {bad[:4]} are outside the vocabulary 0..{vocab - 1}")
        need = len(req.prompt) + req.params.max_new_tokens
        if need > self.runner.max_context:
            raise BadRequest(
                f"the prompt ({len(req.prompt)} tokens) plus max_new_tokens ({req.params.max_new_tokens}) is "
                f"{need} tokens, longer than the context of {self.runner.max_context}"
            )
        kv = self.runner.kv_cache
        if -(-need // kv.page_size) > kv.num_pages:
            raise BadRequest(f"{need} tokens need {-(-need // kv.page_size)} KV pages; the cache has {kv.num_pages}")

    def check_room(self, queued_elsewhere: int = 0) -> None:
        """QueueFull when ``max_waiting`` requests wait (counting those queued before the scheduler)."""
        queued = len(self.waiting) + queued_elsewhere
        if queued >= self.cfg.max_waiting:
            raise QueueFull(f"{queued} requests are waiting (max_waiting {self.cfg.max_waiting}); retry later")

    def add(self, req: Request) -> None:
        self.check(req)
        self.check_room()
        self.waiting.append(req)

    def abort(self, rid: str) -> None:
        """Stop a request (its client went away). Its KV is freed at the next step, or, for a
        prompt whose bullet prefill is in flight, when that prefill lands."""
        for req in [*self.waiting, *self.running, *self.prefilling]:
            if req.rid == rid:
                req.aborted = True

    def fail_all(self, reason: str) -> list[Event]:
        """Finish every request with ``reason`` (after a failed step, or at shutdown) and free
        their KV. After a failed step, the events it made before it raised come first (a request
        it finished is in no queue any more, and its client must still hear of it)."""
        for lane in self._streams:
            try:
                self._sync(lane)
            except Exception:  # a sticky CUDA error: the pages are freed anyway, nothing runs after
                pass
        for flight in self._unread:  # their results are dropped with the requests; their pages come back
            for pages in flight.held:
                self.runner.kv_cache.give_back(pages)
        self._flight, self._unread = None, []
        reqs = [*self.waiting, *self.running, *self.prefilling]
        self.waiting.clear()
        self.running.clear()
        self.prefilling, self._prefill_step, self._inflight = [], None, []
        self._prefill_logits = self._prefill_done = None
        made, self._step_events = self._step_events, []  # a failed step's events, not delivered yet
        events = made + [self._finish(req, reason) for req in reqs]
        self._step_events = []  # returned here, not by a step
        return events

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling or self._unread)

    def _fits(self, req: Request, tokens: int) -> bool:
        kv = self.runner.kv_cache
        return kv.pages_needed(req.rid, tokens) + len(self.running) <= kv.num_free_pages

    def _would_admit(self) -> bool:
        """Would :meth:`_admit` take the head of the queue now? (No side effects.)"""
        return (bool(self.waiting) and len(self.running) + len(self.prefilling) < self.cfg.max_running
                and self._fits(self.waiting[0], len(self.waiting[0].prefill_tokens)))

    def _admit(self, max_tokens: int | None = None) -> Request | None:
        """The head of the queue, if the cache has room for its prompt and the decode batch for
        one more request (prompts being prefilled count), and its prompt has at most
        ``max_tokens`` tokens (where given)."""
        if not self.waiting or len(self.running) + len(self.prefilling) >= self.cfg.max_running:
            return None
        req = self.waiting[0]
        if max_tokens is not None and len(req.prefill_tokens) > max_tokens:
            return None
        if not self._fits(req, len(req.prefill_tokens)):
            return None
        self.waiting.popleft()
        req.state = State.PREFILLING
        self.prefilling.append(req)
        return req

    def _admit_prefill(self) -> int:
        """Admit waiting prompts into one prefill (``max_prefill_tokens``, the graphs' sequences)
        and reserve their KV; their total tokens."""
        tokens = 0
        while self.waiting and len(self.prefilling) < self.runner.cfg.prefill_max_seqs:
            if self.prefilling and tokens + len(self.waiting[0].prefill_tokens) > self.cfg.max_prefill_tokens:
                break
            req = self._admit()
            if req is None:
                break
            self.runner.reserve([(req.rid, req.prefill_tokens)])
            tokens += len(req.prefill_tokens)
        return tokens

    # -- one iteration ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[Event]:
        self._step_events = []
        events = self._reap_aborted()
        mode = self.cfg.mode
        if mode == "sequential":
            if self._overlapping() and not self._would_admit():
                events += self._decode_overlapped(self.placements(self._decode_context(), None)[0])
            else:
                events += self._drain()
                events += self._prefill_batch() or self._decode_only()
        elif mode == "chunked" or self._fusing():
            if mode == "bullet":
                self._whole_gpu_step()
            if self._overlapping() and not self.prefilling and not self._would_admit():
                events += self._decode_overlapped(WHOLE_GPU)
            elif self._overlapping():
                events += self._chunked_overlapped()
            else:
                events += self._drain()
                events += self._chunked()
        else:
            events += self._bullet()
        self.counters["steps"] += 1
        self._step_events = []  # returned: the caller delivers them
        return events

    def _reap_aborted(self) -> list[Event]:
        events = []
        for req in [r for r in self.waiting if r.aborted]:
            self.waiting.remove(req)
            events.append(self._finish(req, "abort"))
        for req in [r for r in self.running if r.aborted]:
            self.running.remove(req)
            events.append(self._finish(req, "abort"))
        if self._prefill_step is None:  # chunked (a bullet prefill in flight finishes first: _join)
            for req in [r for r in self.prefilling if r.aborted]:
                self.prefilling.remove(req)
                events.append(self._finish(req, "abort"))
        return events

    def _finish(self, req: Request, reason: str) -> Event:
        if req.rid in self.runner.kv_cache:
            if not self._unread:
                self.runner.release(req.rid)
            else:  # a decode step in flight may still write these pages: free them once the
                # newest is read (the older ones are read before it)
                self._unread[-1].held.append(self.runner.kv_cache.detach(req.rid))
        req.state, req.finish_reason = State.FINISHED, reason
        self.counters["finished_error" if reason.startswith("error") else f"finished_{reason}"] += 1
        return self._made(Event(req, [], True, len(req.output)))

    def _made(self, event: Event) -> Event:
        self._step_events.append(event)
        return event

    def _emit(self, req: Request, token: int) -> Event:
        """Append a sampled token; finish the request on a stop token or its length."""
        req.output.append(token)
        p = self.cfg
        stop = token in req.params.stop_token_ids or (token in p.eos_token_ids and not req.params.ignore_eos)
        if stop or len(req.output) >= req.params.max_new_tokens:
            ev = self._finish(req, "stop" if stop else "length")
            ev.new_tokens = [token]
            return ev
        return self._made(Event(req, [token], False, len(req.output)))

    def _sample_rows(self, reqs: Sequence[Request], logits: torch.Tensor) -> list[int]:
        """The next token of each request from its logits row: greedy rows in one argmax (one
        host sync for the batch), sampled rows one by one."""
        tokens = logits[: len(reqs)].argmax(-1).tolist()
        for i, req in enumerate(reqs):
            if req.params.temperature > 0:
                tokens[i] = self._sample(req, logits[i])
        return tokens

    def _sample(self, req: Request, logits: torch.Tensor) -> int:
        p = req.params
        probs = torch.softmax(logits.float() / p.temperature, dim=-1)
        if p.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        gen = torch.Generator(device=probs.device)
        if p.seed is None:
            gen.seed()  # fresh entropy for this generator only (torch.seed() would reseed the globals)
        else:  # crc32, not hash(): str hashes change per process, a seed must not
            gen.manual_seed(zlib.crc32(f"{p.seed}:{req.rid}:{len(req.output)}".encode()))
        return int(torch.multinomial(probs, 1, generator=gen))

    # -- decode ----------------------------------------------------------------------------------

    def _reserve_decode(self) -> None:
        """One KV slot per running request; preempt the newest until they fit."""
        while self.running:
            try:
                self.runner.reserve([(r.rid, [r.output[-1]]) for r in self.running])
                return
            except KVCacheExhausted:
                self._preempt(self.running.pop())

    def _preempt(self, req: Request) -> None:
        assert not self._unread, "preemption runs only with no decode step in flight"
        self.runner.release(req.rid)
        req.state, req.computed = State.WAITING, 0
        req.preemptions += 1
        self.counters["preemptions"] += 1
        self.waiting.appendleft(req)

    def _decode_context(self) -> tuple[int, int] | None:
        if not self.running:
            return None
        return len(self.running), max(r.total_len for r in self.running)

    def _launch_decode(self, placement: Placement, reserved: bool = False):
        """Plan and launch the running batch's next step (reserving its KV slots first unless
        ``reserved``); ``(batch, logits)`` or None."""
        if not reserved:
            self._reserve_decode()
        if not self.running:
            return None
        batch = list(self.running)
        ids, fb = self.runner.plan_decode([r.rid for r in batch], [r.output[-1] for r in batch])
        return batch, self._launch(ids, fb, placement, "decode")

    def _launch(self, ids, fb, placement: Placement, lane: str):
        step = self.runner.prepare(ids, fb, placement)
        return step.launch(self._streams.get(lane))[: step.rows]

    def _decode_only(self) -> list[Event]:
        return self._take_decode(self._launch_decode(self.placements(self._decode_context(), None)[0]))

    def _take_decode(self, out) -> list[Event]:
        if out is None:
            return []
        batch, logits = out
        self._sync("decode")
        events = [self._emit(r, t) for r, t in zip(batch, self._sample_rows(batch, logits))]
        self.running = [r for r in self.running if not r.finished]
        self.counters["decode_steps"] += 1
        return events

    def _sync(self, lane: str) -> None:
        if lane in self._streams:
            self._streams[lane].synchronize()

    # -- decode, overlapped (cfg.overlap) ---------------------------------------------------------

    def _overlapping(self) -> bool:
        """Overlap this step: asked for, and every running request greedy (a sampled row needs
        its logits on the host before the next step)."""
        return self.cfg.overlap and all(r.params.temperature == 0 for r in self.running)

    def _drain(self) -> list[Event]:
        """Read back the decode steps in flight (waiting for them): their events."""
        self._flight = None
        events = []
        while self._unread:
            events += self._collect(self._unread[0])
        return events

    def _decode_overlapped(self, placement: Placement) -> list[Event]:
        prev, sync_out, events = self._launch_next(placement)
        return events + self._read_decode(prev, sync_out)

    def _launch_next(self, placement: Placement):
        """Launch the running batch's next decode step. Overlapped: while the step in flight still
        runs, with its tokens fed on the GPU; returns ``(that earlier flight, None, [])`` to
        collect after other launches. When the KV cache cannot take the next slots, preemption
        needs every token on the host: the flight is drained and the ordinary step launched,
        ``(None, (batch, logits), drained events)``."""
        prev = self._flight
        rows = self._rows_after(prev)
        try:
            self.runner.reserve([(r.rid, [0]) for r in rows])  # one slot each; tokens come later
        except KVCacheExhausted:
            events = self._drain()
            return None, self._launch_decode(placement), events
        self._queue_flight(rows, prev, placement)
        return prev, None, []

    def _rows_after(self, prev: DecodeFlight | None) -> list[Request]:
        """The running requests that take a decode row after the step in flight ``prev``: one
        reaching its length there is left out; one that hits a stop token there cannot be known
        yet and computes one wasted row."""
        pending = prev.row_of if prev is not None else {}
        return [r for r in self.running if len(r.output) + (id(r) in pending) < r.params.max_new_tokens]

    def _queue_flight(self, rows: list[Request], prev: DecodeFlight | None, placement: Placement) -> None:
        """Launch the decode step of ``rows`` (slots reserved) behind ``prev``: the newest flight."""
        self._flight = self._launch_flight(rows, prev, placement) if rows else None
        if self._flight is not None:
            self._unread.append(self._flight)

    def _read_decode(self, prev: DecodeFlight | None, sync_out) -> list[Event]:
        """The events of what :meth:`_launch_next` left to read."""
        if prev is not None:
            return self._collect(prev)
        return self._take_decode(sync_out)

    @staticmethod
    def _host_tokens(rows: list[Request], prev: DecodeFlight | None) -> list[int]:
        """Each row's input token as the host knows it: its last token, or a placeholder 0 where
        the step in flight ``prev`` makes it (fed on the GPU by :meth:`_feed_pending`)."""
        pending = prev.row_of if prev is not None else {}
        return [0 if id(r) in pending else r.output[-1] for r in rows]

    def _launch_flight(self, rows: list[Request], prev: DecodeFlight | None, placement: Placement) -> DecodeFlight:
        ids, fb = self.runner.plan_decode([r.rid for r in rows], self._host_tokens(rows, prev))
        stream = self._streams.get("decode")
        # Everything below is queued on the decode stream, behind the step in flight: the copies
        # into a graph's static buffers cannot overtake a replay still reading them, and the
        # earlier step's tokens are read on the stream that made them.
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if prev is not None:
                ids = self._feed_pending(ids, 0, rows, prev)
            step = self.runner.prepare(ids, fb, placement)
            flight = self._flight_of(rows, step.launch(stream)[: step.rows])
        self.counters["overlapped_decode_steps"] += 1
        return flight

    def _flight_of(self, rows: list[Request], logits) -> DecodeFlight:
        """The greedy tokens of ``rows`` from their logits rows, left on the GPU, with a copy to
        the host queued on the current stream (the decode stream) and an event marking it."""
        tokens = logits[: len(rows)].argmax(-1)
        done = None
        if self.runner.device.type == "cuda":
            host = torch.empty(len(rows), dtype=torch.int64, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream())
        else:
            host = tokens
        return DecodeFlight(rows, {id(r): i for i, r in enumerate(rows)}, tokens, host, done)

    def _collect(self, flight: DecodeFlight) -> list[Event]:
        """Wait for ``flight``'s tokens and hand them to its requests; then free what it held."""
        if flight.done is not None:
            flight.done.synchronize()
        events = []
        for req, token in zip(flight.batch, flight.host.tolist()):
            if req.finished:  # stopped at the step before, or aborted: a wasted row
                continue
            events.append(self._emit(req, token))
        self.running = [r for r in self.running if not r.finished]
        for pages in flight.held:
            self.runner.kv_cache.give_back(pages)
        self._unread.remove(flight)  # only now: until here a failure must still find its pages
        if not flight.fused:
            self.counters["decode_steps"] += 1
        return events

    # -- prefill, three ways ---------------------------------------------------------------------

    def _prefill_batch(self) -> list[Event]:
        """sequential: prefill the waiting prompts that fit, up to max_prefill_tokens, in one step."""
        tokens = self._admit_prefill()
        if not self.prefilling:
            return []
        reqs = list(self.prefilling)
        ids, fb = self.runner.plan_prefill([(r.rid, r.prefill_tokens) for r in reqs])
        logits = self._launch(ids, fb, self.placements(None, (tokens, 1))[1], "prefill")
        self._sync("prefill")
        self.counters["prefill_steps"] += 1
        return self._join(reqs, logits)

    def _join(self, reqs: Sequence[Request], logits) -> list[Event]:
        """Prompts whose KV is complete: sample their next token and join the decode batch. Each
        leaves ``prefilling`` only once it is handled."""
        events = []
        tokens = self._sample_rows([r for r in reqs], logits)
        for req, token in zip(reqs, tokens):
            self.prefilling.remove(req)
            if req.aborted:
                events.append(self._finish(req, "abort"))
                continue
            req.computed = len(req.prefill_tokens)
            ev = self._emit(req, token)
            if not ev.finished:
                req.state = State.RUNNING
                self.running.append(req)
            events.append(ev)
        return events

    def _chunked(self) -> list[Event]:
        self._reserve_decode()
        decode = list(self.running)
        chunks = self._take_chunks(len(decode))
        if not chunks:
            return self._take_decode(self._launch_decode(WHOLE_GPU, reserved=True))
        ids, fb = self.runner.plan_mixed([(r.rid, part) for r, part in chunks], [r.rid for r in decode],
                                         [r.output[-1] for r in decode])
        logits = self._launch(ids, fb, WHOLE_GPU, "prefill")
        self._sync("prefill")
        return self._after_mixed(chunks, decode, logits)

    def _take_chunks(self, decode_rows: int) -> list[tuple[Request, list[int]]]:
        """The prompt chunks of a fused step beside ``decode_rows`` decode tokens: prompts in
        progress first, then new ones, as much of each as fits ``chunk_size``, KV reserved."""
        room = self.cfg.chunk_size - decode_rows
        chunks: list[tuple[Request, list[int]]] = []
        candidates = iter(list(self.prefilling))
        while room > 0 and decode_rows + len(chunks) < self.runner.cfg.prefill_max_seqs:
            # in progress first, then new ones (bullet: only those short enough to fuse)
            req = next(candidates, None) or self._admit(self.cfg.fuse_prompt_tokens or None)
            if req is None:
                break
            part = req.prefill_tokens[req.computed: req.computed + room]
            try:
                self.runner.reserve([(req.rid, part)])
            except KVCacheExhausted:
                break  # the decode batch first; the chunk waits for pages
            chunks.append((req, part))
            room -= len(part)
        return chunks

    def _after_mixed(self, chunks, decode: list[Request], logits) -> list[Event]:
        """The events of a fused step whose logits are ready: the decode rows' tokens (rows of
        requests finished meanwhile are dropped), then the prompts whose last chunk ran."""
        self.counters["mixed_steps"] += 1
        n = len(chunks)
        events = [self._emit(r, t) for r, t in zip(decode, self._sample_rows(decode, logits[n:])) if not r.finished]
        self.running = [r for r in self.running if not r.finished]
        done = []
        for i, (req, part) in enumerate(chunks):
            req.computed += len(part)
            if req.computed == len(req.prefill_tokens):
                done.append(i)
        if done:
            events += self._join([chunks[i][0] for i in done], logits[done])
        return events

    def _chunked_overlapped(self) -> list[Event]:
        """A fused step on the decode stream, launched behind the step in flight (if any) with
        that step's tokens fed to its decode rows on the GPU, so the host's planning, copies and
        launch do not leave the GPU idle between them (about 1 ms per fused step at batch 64 on
        the H200). A fused step that completes no prompt is itself left in flight, like a
        decode step: the next step is launched behind it in turn. One that completes a prompt is
        waited for and read at once, since the prompt's first token is sampled on the host
        before it can decode. Where the cache cannot take the decode rows' next slots
        (preemption needs every token on the host) the ordinary path runs; where no chunk fits,
        an overlapped decode step."""
        prev = self._flight
        decode = self._rows_after(prev)
        try:
            self.runner.reserve([(r.rid, [0]) for r in decode])  # one slot each; tokens come later
        except KVCacheExhausted:
            return self._drain() + self._chunked()
        chunks = self._take_chunks(len(decode))
        if not chunks:  # the slots are reserved: the next decode step runs overlapped as usual
            self._queue_flight(decode, prev, WHOLE_GPU)
            return self._collect(prev) if prev is not None else []
        ids, fb = self.runner.plan_mixed([(r.rid, part) for r, part in chunks], [r.rid for r in decode],
                                         self._host_tokens(decode, prev))
        n = len(chunks)
        completes = any(req.computed + len(part) == len(req.prefill_tokens) for req, part in chunks)
        stream = self._streams.get("decode")
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if prev is not None:
                ids = self._feed_pending(ids, sum(len(part) for _, part in chunks), decode, prev)
            logits = self._launch(ids, fb, WHOLE_GPU, "decode")
            flight = None if completes or not decode else self._flight_of(decode, logits[n:])
        if prev is not None:  # launched behind the step in flight
            self.counters["overlapped_mixed_steps"] += 1
        if flight is not None:  # read later, as a decode step; pages freed meanwhile wait for it
            flight.fused = True
            self.counters["mixed_steps"] += 1
            self.counters["mixed_steps_in_flight"] += 1
            for req, part in chunks:
                req.computed += len(part)
            self._flight = flight
            self._unread.append(flight)
            return self._collect(prev) if prev is not None else []
        self._flight = None
        # The fused step first: a request that stopped at `prev` still has a row in it, writing
        # its KV slot, and reading `prev` frees its pages.
        self._sync("decode")
        events = self._collect(prev) if prev is not None else []
        return events + self._after_mixed(chunks, decode, logits)

    def _feed_pending(self, ids: torch.Tensor, offset: int, rows: list[Request], prev: DecodeFlight) -> torch.Tensor:
        """``ids`` with rows ``offset + i`` replaced, on the current stream, by the token the step
        in flight ``prev`` makes for ``rows[i]`` (where it has a row for it)."""
        pending = prev.row_of
        if not any(id(r) in pending for r in rows):
            return ids
        src = torch.tensor([pending.get(id(r), -1) for r in rows], dtype=torch.int64)
        if self.runner.device.type == "cuda":
            src = src.pin_memory().to(self.runner.device, non_blocking=True)
            ids = ids.pin_memory().to(self.runner.device, non_blocking=True)
        part = ids[offset: offset + len(rows)]
        ids[offset: offset + len(rows)] = torch.where(src >= 0, prev.tokens[src.clamp(min=0)], part)
        return ids

    def _fusing(self) -> bool:
        """bullet with ``fuse_prompt_tokens``: is this step a fused one? With no prefill on the
        lane, while prompts are being prefilled in chunks, or when the head of the queue is
        short enough and would be admitted now."""
        limit = self.cfg.fuse_prompt_tokens
        if not limit or self._prefill_step is not None:
            return False
        # Chunks in progress (a lane prefill always has its step), or a fused step not read yet:
        # it runs the prefill graphs, whose static buffers a lane prefill's prepare() would fill
        # before it is done (its prompt may have been aborted meanwhile).
        if self.prefilling or any(f.fused for f in self._unread):
            return True
        # A fused step needs room beside the decode rows (else the prompt would wait for the
        # decode batch to shrink while the lane idles).
        room = min(self.cfg.chunk_size, self.runner.cfg.prefill_max_seqs) > len(self.running)
        return room and self._would_admit() and len(self.waiting[0].prefill_tokens) <= limit

    def _whole_gpu_step(self) -> None:
        """A fused step of the bullet scheduler runs on the whole GPU: no split is held, so the
        next split waits for it (see the change of hands in :meth:`_bullet`)."""
        self._split, self._placed = None, (WHOLE_GPU, WHOLE_GPU)
        self.last_split = {"decode": 0, "prefill": 0}

    def _bullet(self) -> list[Event]:
        if not self.prefilling:
            self._start_prefill()
        reqs = list(self.prefilling)
        groups = len(self.runner.groups)
        tokens = sum(len(r.prefill_tokens) for r in reqs)
        prefill_work = (tokens, groups - self._prefill_group) if reqs else None
        decode_place, prefill_place = self.placements(self._decode_context(), prefill_work)
        if self._keep_split(reqs, decode_place):
            decode_place, prefill_place = self._placed
        self._placed = decode_place, prefill_place
        if decode_place.split != self._split:
            self._sync("prefill")  # the SMs change hands: the last layer group must be done first
            if self._flight is not None and self._flight.done is not None:
                # and the decode step in flight on the old split (a GPU-side wait: no host block)
                self._streams["prefill"].wait_event(self._flight.done)
            self._split = decode_place.split
        self.last_split = {"decode": _sms(decode_place), "prefill": _sms(prefill_place)}
        # First the decode step, so the decode lane starts at once.
        if self._overlapping():
            prev, decode_out, events = self._launch_next(decode_place)
        else:
            prev, events = None, self._drain()
            decode_out = self._launch_decode(decode_place)
        # Keep the prefill lane fed: up to prefill_ahead layer groups queued on its stream (a
        # group shorter than the decode step would otherwise leave its SMs idle until the next
        # step). Without a GPU, one group per step.
        self._inflight = [e for e in self._inflight if not e.query()]
        if not self.running and self._inflight and self._prefill_group < groups:
            # Nothing to decode: wait for the oldest queued group (one stays queued) rather than
            # spin steps that hold the GIL the HTTP side needs.
            self._inflight.pop(0).synchronize()
        while reqs and self._prefill_group < groups and len(self._inflight) < self.cfg.prefill_ahead:
            out = self._prefill_step.launch_group(self._prefill_group, prefill_place, self._streams.get("prefill"))
            self._prefill_group += 1
            if self._prefill_group == groups:
                self._prefill_logits = out[: self._prefill_step.rows]
            if "prefill" not in self._streams:
                break
            self._inflight.append(torch.cuda.Event())
            self._inflight[-1].record(self._streams["prefill"])
            if self._prefill_group == groups:
                self._prefill_done = self._inflight[-1]
        events += self._read_decode(prev, decode_out)
        if self._prefill_logits is not None and self._prefill_landed():
            logits = self._prefill_logits
            self._prefill_step, self._inflight, self._prefill_logits, self._prefill_done = None, [], None, None
            self.counters["prefills"] += 1
            events += self._join(reqs, logits)
        return events

    def _prefill_landed(self) -> bool:
        """Is the prefill's last layer group done? Asked without blocking while decode steps
        run, so a prompt's last groups never hold up the decode lane (waiting here for the
        queued groups cost up to 110 ms per prefill at 20 req/s on the H200, a TPOT spike for
        every running request); waited for when nothing decodes."""
        if self._prefill_done is None:  # no GPU: the groups ran as they were launched
            return True
        if self.running or self._unread:
            return self._prefill_done.query()
        self._prefill_done.synchronize()
        return True

    def _keep_split(self, reqs, decode_place: Placement) -> bool:
        """Mid-prefill, keep the split unless the new one gives decode more SMs; once every
        layer group is queued, keep it whatever the decision. Changing hands waits for the
        prefill groups queued on the lane (several ms; with every group queued, the whole
        tail), so a decision that would only give decode fewer SMs (its batch shrank) waits for
        the prefill to end."""
        if not reqs or self._prefill_group == 0 or self._split is None or decode_place.split is None:
            return False
        if self._prefill_done is not None and self._prefill_done.query():
            return False  # the prefill has landed: changing hands waits for nothing
        return self._prefill_group == len(self.runner.groups) or _sms(decode_place) <= self._split["decode"]

    def _start_prefill(self) -> None:
        """Admit the waiting prompts that fit one prefill and prepare it; its layer groups then
        run beside decode steps."""
        tokens = self._admit_prefill()
        if self.prefilling:
            ids, fb = self.runner.plan_prefill([(r.rid, r.prefill_tokens) for r in self.prefilling])
            placement = self.placements(self._decode_context(), (tokens, len(self.runner.groups)))[1]
            self._prefill_step = self.runner.prepare(ids, fb, placement)
            self._prefill_group = 0


def _sms(placement: Placement) -> int:
    return 0 if placement.split is None else placement.split[placement.lane]
