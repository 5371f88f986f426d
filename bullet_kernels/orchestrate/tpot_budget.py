"""A TPOT target read as a per-request mean: how long a decode step beside a prefill may take.

A request's TPOT is the mean of its decode steps. :class:`~.policy.SLOPolicy` by default keeps
every co-running step within the target ("step" mode), which holds every request to it but gives
the prefill lane only what a step at the target leaves, even when most steps run alone on the
whole GPU far below it. "average" mode spends that slack: if a share ``phi`` of recent decode
steps ran beside a prefill and a step alone takes ``alone_ms``, a co-running step may take

    (tpot_ms - (1 - phi) * alone_ms) / phi

and the mean still meets the target; never less than the target itself (what step mode allows).
Why: on the H200 at 9182cc2 the adapter was bounded by TTFT, not TPOT, at its top rates under a
15 ms target (P90 TPOT 13.1 ms, P90 TTFT 872 ms at 19 req/s): prefill needed SMs that the
per-step bound kept on decode.

What it costs: the mean is what is held, not every request; requests that live through more
co-running steps than the recent share land above it, so the P90 rises toward the target. The
share is clamped from below (:data:`MIN_SHARE`): a rare prefill must not let decode starve.
"""

from __future__ import annotations

import collections

TPOT_MODES = ("step", "average")
WINDOW = 256  # decode steps the share is taken over: about one request's output on the standard trace
MIN_STEPS = 32  # fewer observed than this: no share yet (the policy acts as in step mode)
MIN_SHARE = 0.25  # the share planned with is never below this: the bound is at most 4x the target


class CorunShare:
    """The share of the last :data:`WINDOW` decode steps that ran beside a prefill."""

    def __init__(self, window: int = WINDOW, min_steps: int = MIN_STEPS):
        if window < 1 or not 1 <= min_steps <= window:
            raise ValueError(f"need window >= 1 and 1 <= min_steps <= window, got {window}, {min_steps}")
        self.min_steps = min_steps
        self._steps: collections.deque[bool] = collections.deque(maxlen=window)
        self._corun = 0

    def observe(self, corun: bool) -> None:
        """One decode step; ``corun``: a prefill ran beside it."""
        if len(self._steps) == self._steps.maxlen:
            self._corun -= self._steps[0]
        self._steps.append(bool(corun))
        self._corun += bool(corun)

    def clear(self) -> None:
        """Forget every step (a new run)."""
        self._steps.clear()
        self._corun = 0

    def counts(self) -> tuple[int, int]:
        """(steps beside a prefill, steps) in the window."""
        return self._corun, len(self._steps)

    def value(self) -> float | None:
        """The share, or None while fewer than ``min_steps`` steps were observed."""
        if len(self._steps) < self.min_steps:
            return None
        return self._corun / len(self._steps)


def corun_step_bound_ms(tpot_ms: float, alone_ms: float, share: float | None, min_share: float = MIN_SHARE) -> float:
    """The longest co-running step that keeps the mean step within ``tpot_ms`` when a share
    ``share`` of steps co-run and the rest take ``alone_ms`` (module notes); ``tpot_ms`` when the
    share is unknown or a step alone already misses the target."""
    if not tpot_ms > 0 or not alone_ms >= 0:
        raise ValueError(f"need tpot_ms > 0 and alone_ms >= 0, got {tpot_ms}, {alone_ms}")
    if not 0 < min_share <= 1:
        raise ValueError(f"min_share must be in (0, 1], got {min_share}")
    if share is None:
        return tpot_ms
    if not 0 <= share <= 1:
        raise ValueError(f"a share is in [0, 1], got {share}")
    phi = max(share, min_share)
    return max(tpot_ms, (tpot_ms - (1 - phi) * alone_ms) / phi)
