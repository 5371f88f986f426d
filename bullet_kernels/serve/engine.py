"""The serving loop: the scheduler stepping on its own thread, requests in and tokens out.

The HTTP side (asyncio) never touches the scheduler: :meth:`ServingEngine.submit` checks a
request (the scheduler's own checks, so bad input is refused before it is queued) and hands it
over through a thread-safe inbox; the loop thread moves the inbox into the scheduler between
steps, runs a step, and passes each :class:`~.scheduler.Event` to the request's sink (a callable
the caller gives; the server's puts the event on its asyncio queue). A step that raises fails
every request it held, with the error as finish reason, and the loop goes on; a sink that raises
is logged and dropped. When the loop ends (shutdown, or a failure outside a step) every request
still held is finished with a reason, so no client waits forever.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

from ..errors import BulletError
from .request import BadRequest, Request
from .scheduler import Event, Scheduler

log = logging.getLogger("bullet_kernels.serve")
Sink = Callable[[Event], None]


class LoopSink:
    """A sink that puts events on an asyncio queue owned by ``loop``. The serving loop hands all
    of one step's events bound for one event loop over in a single wake-up of that loop: one
    ``call_soon_threadsafe`` (a syscall, and a GIL hand-over) per step, not one per request."""

    def __init__(self, loop, queue):
        self.loop, self.queue = loop, queue

    def __call__(self, ev: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)


def _put_all(items) -> None:
    for queue, ev in items:
        queue.put_nowait(ev)


class ShuttingDown(BulletError):
    """The engine no longer accepts requests (the server answers 503)."""


class ServingEngine:
    def __init__(self, scheduler: Scheduler, idle_wait_s: float = 0.05,
                 observe_step: Callable[[float], None] | None = None):
        """``observe_step(seconds)`` is called on the loop thread after every step (metrics)."""
        self.scheduler = scheduler
        self.observe_step = observe_step
        self.idle_wait_s = idle_wait_s
        self._inbox: collections.deque[tuple[Request, Sink]] = collections.deque()
        self._aborts: collections.deque[str] = collections.deque()
        self._sinks: dict[str, Sink] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="bullet-serving-loop", daemon=True)
        self.errors = 0

    # -- the caller's side -------------------------------------------------------------------

    def start(self) -> "ServingEngine":
        self._thread.start()
        return self

    def submit(self, req: Request, sink: Sink) -> None:
        """Queue ``req``; BadRequest, QueueFull or ShuttingDown instead, with nothing queued."""
        if not self._accepting or not self.alive:
            raise ShuttingDown("the server is shutting down or its serving loop stopped; no new requests")
        self.scheduler.check(req)
        if req.rid in self._sinks or any(r.rid == req.rid for r, _ in list(self._inbox)):
            raise BadRequest(f"request id {req.rid!r} is already in flight; give each request its own rid")
        self.scheduler.check_room(len(self._inbox))
        self._inbox.append((req, sink))
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def abort(self, rid: str) -> None:
        self._aborts.append(rid)
        self._wake.set()

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler.waiting) + len(self._inbox)

    def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop accepting; finish what is queued (``drain``, within ``timeout_s``), then stop the
        loop, which finishes anything left with reason "shutdown"."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        if drain:
            while self.alive and (self._inbox or self.scheduler.has_work()) and time.monotonic() < deadline:
                time.sleep(0.01)
        self._stop.set()
        self._wake.set()
        if self.alive:
            self._thread.join(timeout=60)
        elif self._inbox or self._sinks:  # never started, or already dead: finish here
            self._finish_everything("shutdown")

    # -- the loop thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("the serving loop failed")
            self.errors += 1
        finally:
            self._finish_everything("shutdown" if self._stop.is_set() else "error: the serving loop stopped")

    def _run(self) -> None:
        s = self.scheduler
        while not self._stop.is_set():
            self._take_inbox()
            while self._aborts:
                s.abort(self._aborts.popleft())
            if not s.has_work():
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                events = s.step()
            except Exception as exc:  # a failed step must not take the server down
                self.errors += 1
                log.exception("scheduler step failed")
                events = s.fail_all(f"error: {type(exc).__name__}: {exc}")
            if self.observe_step is not None:
                self.observe_step(time.perf_counter() - t0)
            self._deliver(events)

    def _take_inbox(self) -> None:
        while self._inbox:
            req, sink = self._inbox.popleft()
            self._sinks[req.rid] = sink
            self.scheduler.waiting.append(req)  # checked in submit(), the queue bound too

    def _deliver(self, events) -> None:
        by_loop: dict = {}  # event loop -> [(queue, event)], in order
        for ev in events:
            sink = self._sinks.pop(ev.request.rid, None) if ev.finished else self._sinks.get(ev.request.rid)
            if sink is None:
                continue
            if isinstance(sink, LoopSink):
                by_loop.setdefault(sink.loop, []).append((sink.queue, ev))
                continue
            try:
                sink(ev)
            except Exception:  # e.g. the client's event loop is gone: drop that client only
                log.exception("dropping the sink of request %s", ev.request.rid)
                self._sinks.pop(ev.request.rid, None)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except Exception:  # that event loop is gone: drop its clients only
                log.exception("dropping the sinks of %d request(s) on a closed event loop", len(items))
                for _, ev in items:
                    self._sinks.pop(ev.request.rid, None)

    def _finish_everything(self, reason: str) -> None:
        """Finish every request the engine holds (scheduler and inbox) and tell its client."""
        self._take_inbox()
        try:
            events = self.scheduler.fail_all(reason)
        except Exception:
            log.exception("could not finish the scheduler's requests")
            events = []
        self._deliver(events)
