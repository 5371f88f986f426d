"""The serving loop: the scheduler stepping on its own thread, requests in and tokens out.

The HTTP side (asyncio) never touches the scheduler: :meth:`ServingEngine.submit` checks a
request (the scheduler's own checks, so bad input is refused before it is queued) and hands it
over through a thread-safe inbox; the loop thread moves the inbox into the scheduler between
steps, runs a step, and passes each :class:`~.scheduler.Event` to the request's sink (a callable
the caller gives; the server's puts the event on its asyncio queue). A step that raises fails
every request it held, with the error as finish reason, and the loop goes on.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

from ..errors import BulletError
from .request import Request
from .scheduler import Event, QueueFull, Scheduler

log = logging.getLogger("bullet_kernels.serve")
Sink = Callable[[Event], None]


class ShuttingDown(BulletError):
    """The engine no longer accepts requests (the server answers 503)."""


class ServingEngine:
    def __init__(self, scheduler: Scheduler, idle_wait_s: float = 0.05):
        self.scheduler = scheduler
        self.idle_wait_s = idle_wait_s
        self._inbox: collections.deque[tuple[Request, Sink]] = collections.deque()
        self._aborts: collections.deque[str] = collections.deque()
        self._sinks: dict[str, Sink] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="bullet-serving-loop", daemon=True)
        self.step_seconds: collections.deque[float] = collections.deque(maxlen=1024)
        self.errors = 0

    # -- the caller's side -------------------------------------------------------------------

    def start(self) -> "ServingEngine":
        self._thread.start()
        return self

    def submit(self, req: Request, sink: Sink) -> None:
        """Queue ``req``; BadRequest, QueueFull or ShuttingDown instead, with nothing queued."""
        if not self._accepting:
            raise ShuttingDown("the server is shutting down; no new requests")
        self.scheduler.check(req)
        queued = len(self.scheduler.waiting) + len(self._inbox)
        if queued >= self.scheduler.cfg.max_waiting:
            raise QueueFull(f"{queued} requests are waiting (max_waiting {self.scheduler.cfg.max_waiting}); retry later")
        self._inbox.append((req, sink))
        self._wake.set()

    def abort(self, rid: str) -> None:
        self._aborts.append(rid)
        self._wake.set()

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler.waiting) + len(self._inbox)

    def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop accepting; finish what is queued (``drain``) or abort it, then stop the loop."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        if drain and self._thread.is_alive():
            while (self._inbox or self.scheduler.has_work()) and time.monotonic() < deadline:
                time.sleep(0.01)
        for req, _ in list(self._inbox):
            self.abort(req.rid)
        for rid in list(self._sinks):
            self.abort(rid)
        while self._sinks and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1)

    # -- the loop thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        s = self.scheduler
        while not self._stop.is_set():
            while self._inbox:
                req, sink = self._inbox.popleft()
                self._sinks[req.rid] = sink
                s.waiting.append(req)  # checked in submit(); the queue bound was checked there too
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
            self.step_seconds.append(time.perf_counter() - t0)
            for ev in events:
                sink = self._sinks.pop(ev.request.rid, None) if ev.finished else self._sinks.get(ev.request.rid)
                if sink is not None:
                    sink(ev)
