"""Split policies: which SMs each phase gets for its next graph.

The orchestrator asks before every decode step and every prefill layer group, with what each
lane has to do next (:class:`Work`). A policy answers with a :class:`Decision`: the whole GPU
for one phase when the other is idle, otherwise one of the candidate splits.

- :class:`SLOPolicy` (BulletServe's SLO-aware provisioning): decode gets the fewest SMs whose
  estimated co-running step time keeps within the TPOT target; prefill gets the rest, and its
  TTFT target is watched (the decision says when the estimate misses it). Where no split meets
  the TPOT target, it falls back to the split with the fastest decode lane and says why. Its
  ``tpot_mode`` "average" reads the target as a per-request mean and lets co-running steps use
  the slack of the steps that run alone (:mod:`.tpot_budget`).
- :class:`StaticPolicy`: one split whenever both phases have work (the comparison baseline).

Both are pure functions of the work and an :class:`~.estimator.Estimator`: no GPU needed, so
the simulated ``bullet bench`` and the tests run them as the orchestrator does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

from ..partition import SMSplit
from .estimator import Estimator
from .tpot_budget import TPOT_MODES, CorunShare, corun_step_bound_ms

PREFILL, DECODE = "prefill", "decode"


@dataclasses.dataclass(frozen=True)
class Work:
    """What the lanes have to do next. ``decode``: (batch, context) of the next decode step or
    None; ``prefill``: tokens of the prefill in progress (or next) or None, with the layer
    groups still to run and the time its first token has left before its TTFT target."""

    decode: tuple[int, int] | None = None
    prefill_tokens: int | None = None
    prefill_groups_left: int = 0
    ttft_left_ms: float | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    split: SMSplit | None  # None: the phase that has work runs on the whole GPU
    decode_ms: float | None = None  # estimated next decode step (co-running where split)
    prefill_ms: float | None = None  # estimated remaining prefill time on this decision's SMs
    feasible: bool = True  # the TPOT target is met by the estimate
    ttft_at_risk: bool = False
    reason: str = ""


def check_splits(splits: Sequence[SMSplit]) -> list[SMSplit]:
    """Candidate splits must have exactly the lanes ``prefill`` and ``decode``."""
    out = [SMSplit.parse(s) if isinstance(s, str) else s for s in splits]
    if not out:
        raise ValueError("a split policy needs at least one candidate split, e.g. prefill=96,decode=36")
    for s in out:
        if set(s.names) != {PREFILL, DECODE}:
            raise ValueError(f"split {s} must have exactly the lanes 'prefill' and 'decode'")
    return out


class Policy:
    def __init__(self, estimator: Estimator, splits: Sequence[SMSplit]):
        self.estimator = estimator
        self.splits = check_splits(splits)
        self.sm_count = estimator.sm_count
        self.ttft_ms: float | None = None  # the TTFT budget when the work names none

    def decide(self, work: Work) -> Decision:
        if work.decode is None and work.prefill_tokens is None:
            return Decision(None, reason="idle")
        if work.prefill_tokens is None:
            b, c = work.decode
            return Decision(None, decode_ms=self.estimator.decode_ms(b, c, self.sm_count).ms, reason="decode alone")
        if work.decode is None:
            return Decision(None, prefill_ms=self._prefill_left(work, self.sm_count, False), reason="prefill alone")
        return self.decide_both(work)

    def decide_both(self, work: Work) -> Decision:
        raise NotImplementedError

    def _decode_corun(self, work: Work, split: SMSplit) -> float:
        b, c = work.decode
        alone = self.estimator.decode_ms(b, c, split[DECODE])
        return self.estimator.corun(alone, DECODE, split[DECODE]).ms

    def _prefill_left(self, work: Work, sms: int, corun: bool, decode_sms: int = 0) -> float:
        groups = self.estimator.groups[len(self.estimator.groups) - max(work.prefill_groups_left, 1):]
        ms = sum(self.estimator.prefill_group_ms(work.prefill_tokens, g, sms).ms for g in groups)
        return ms * (self.estimator.slowdown(PREFILL, decode_sms)[0] if corun else 1.0)

    def _decision(self, work: Work, split: SMSplit, feasible: bool, reason: str) -> Decision:
        prefill_ms = self._prefill_left(work, split[PREFILL], True, split[DECODE])
        budget = work.ttft_left_ms if work.ttft_left_ms is not None else self.ttft_ms
        risk = budget is not None and prefill_ms > budget
        return Decision(split, self._decode_corun(work, split), prefill_ms, feasible, risk, reason)


class StaticPolicy(Policy):
    """The one split whenever both phases have work; the whole GPU for a phase alone."""

    def __init__(self, estimator: Estimator, split: SMSplit | str):
        super().__init__(estimator, [split])

    def decide_both(self, work: Work) -> Decision:
        return self._decision(work, self.splits[0], True, "static split")


class SLOPolicy(Policy):
    """Fewest decode SMs within the TPOT target; prefill takes the rest.

    ``tpot_mode``: "step" (every co-running step within the target) or "average" (the target as
    a per-request mean: a co-running step may take what the recent share of co-running steps in
    ``corun_share``, fed by the caller, leaves; :mod:`.tpot_budget`). Both can change while the
    policy is in use (:meth:`set_tpot_mode`)."""

    def __init__(self, estimator: Estimator, splits: Sequence[SMSplit], tpot_ms: float, ttft_ms: float | None = None,
                 tpot_mode: str = "step", corun_share: CorunShare | None = None):
        super().__init__(estimator, splits)
        if not tpot_ms > 0:
            raise ValueError(f"TPOT target must be > 0 ms, got {tpot_ms}")
        if ttft_ms is not None and not ttft_ms > 0:
            raise ValueError(f"TTFT target must be > 0 ms or None, got {ttft_ms}")
        self.tpot_ms, self.ttft_ms = tpot_ms, ttft_ms
        self.corun_share = corun_share if corun_share is not None else CorunShare()
        self.set_tpot_mode(tpot_mode)
        self.splits.sort(key=lambda s: s[DECODE])

    def set_tpot_mode(self, mode: str) -> None:
        if mode not in TPOT_MODES:
            raise ValueError(f"TPOT mode must be one of {', '.join(TPOT_MODES)}, got {mode!r}")
        self.tpot_mode = mode

    def corun_bound_ms(self, work: Work) -> float:
        """The longest co-running decode step the TPOT target allows for ``work`` now."""
        if self.tpot_mode == "step":
            return self.tpot_ms
        b, c = work.decode
        alone = self.estimator.decode_ms(b, c, self.sm_count).ms
        return corun_step_bound_ms(self.tpot_ms, alone, self.corun_share.value())

    def decide_both(self, work: Work) -> Decision:
        bound = self.corun_bound_ms(work)
        for split in self.splits:
            ms = self._decode_corun(work, split)
            if ms <= bound:
                return self._decision(work, split, True, f"fewest decode SMs with step {ms:.2f} <= {bound:.2f} ms")
        best = min(self.splits, key=lambda s: self._decode_corun(work, s))
        b, c = work.decode
        return self._decision(
            work, best, False,
            f"TPOT target {self.tpot_ms:.2f} ms ({bound:.2f} ms a co-running step, {self.tpot_mode} mode) is "
            f"infeasible for decode batch {b} at context {c} beside a prefill on every candidate split "
            f"(fastest: {best}, {self._decode_corun(work, best):.2f} ms); using that split",
        )


# Decisions are made on contexts and prompt lengths rounded up to this many tokens (so a
# decision is made for at least the real length): a decision costs about 1 ms of estimator
# arithmetic, a tenth of a decode step, and the rounded work repeats from step to step.
WORK_QUANTUM = 64


def round_up_work(n: int) -> int:
    return -(-n // WORK_QUANTUM) * WORK_QUANTUM


def split_chooser(policy: Policy, ttft_left_ms: float | None = None, cache_size: int = 8192,
                  cached: bool = True) -> Callable[[int, int, int | None, int], SMSplit | None]:
    """``choose(batch, context, prompt tokens or None, groups left)``: ``policy``'s split for the
    next step (None: the phase with work takes the whole GPU; batch 0: nothing to decode),
    decided on work rounded up to :data:`WORK_QUANTUM` tokens, once per work when ``cached``. The
    server and the serving simulation both decide through it. ``choose.cache_info()`` reports the
    cache (None uncached). A policy whose decisions change with what it observes (``tpot_mode``
    "average") is refused a cache: a cached decision would outlive what it was made from; the
    caller that feeds it what it observes asks with ``cached=False``."""
    if cached and getattr(policy, "tpot_mode", "step") != "step":
        raise ValueError(f"split_chooser caches decisions, which {policy.tpot_mode!r} TPOT mode changes from step "
                         "to step; feed the policy and ask with cached=False, or use tpot_mode='step'")

    def decide(batch: int, context: int, tokens: int | None, groups_left: int) -> SMSplit | None:
        work = Work(decode=(batch, context) if batch else None, prefill_tokens=tokens,
                    prefill_groups_left=groups_left, ttft_left_ms=ttft_left_ms)
        return policy.decide(work).split

    if cached:
        decide = functools.lru_cache(maxsize=cache_size)(decide)

    def choose(batch: int, context: int, tokens: int | None, groups_left: int) -> SMSplit | None:
        return decide(batch, round_up_work(context) if batch else 0, tokens and round_up_work(tokens), groups_left)

    choose.cache_info = decide.cache_info if cached else None
    return choose

