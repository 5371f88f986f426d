"""The temporal plan: which graph each lane replays next, on which SMs, and what it waits for.

Two chains of graphs, one per phase: a prefill's layer groups and the decode steps. The planner
walks an estimated timeline (:class:`~.estimator.Estimator`): the next launch belongs to the
chain that is estimated to be free first, and the policy picks its SMs from the work both
chains still have (:class:`~.policy.Work`). Rules that keep the lanes exact:

- a graph in flight never changes SMs (a split is chosen per launch, before it is issued);
- two chains overlap only on the two lanes of one split: a launch on another split or on the
  whole GPU waits for the other chain's last launch (``after_other``), so no two graphs ever
  share an SM;
- when one chain has nothing left, the other gets the whole GPU (``handoff``; a static-split
  baseline turns it off and keeps its split to the end).

The same plan drives the GPU (:class:`~.orchestrator.Orchestrator` issues it with events) and
the simulation (its estimated times are the simulated result).
"""

from __future__ import annotations

import dataclasses

from ..partition import SMSplit
from .estimator import Estimator
from .policy import DECODE, PREFILL, Policy, Work

UNSET = object()  # a chain that has issued nothing yet


@dataclasses.dataclass(frozen=True)
class MixWork:
    """One prompt of ``prompt_tokens`` prefilled beside ``decode_steps`` steps of a decode
    batch of ``decode_batch`` sequences with ``context`` cached tokens each."""

    prompt_tokens: int
    decode_batch: int
    context: int
    decode_steps: int

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            least = 0 if f.name == "decode_steps" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"{f.name} must be an int >= {least}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class Launch:
    phase: str  # "prefill" or "decode"
    index: int  # prefill: layer group; decode: step number
    split: SMSplit | None  # None: the whole GPU
    start_ms: float  # estimated
    end_ms: float
    corun: bool  # estimated beside the other chain
    after_other: bool  # waits for the other chain's last launch (the SMs change hands)

    @property
    def lane(self) -> str:
        return "main" if self.split is None else self.phase


def plan_mix(work: MixWork, estimator: Estimator, policy: Policy, handoff: bool = True) -> list[Launch]:
    """Every launch of ``work`` in issue order, with estimated start and end times."""
    groups = estimator.groups
    g = k = 0
    t = {PREFILL: 0.0, DECODE: 0.0}
    last: dict = {PREFILL: UNSET, DECODE: UNSET}
    out: list[Launch] = []
    while g < len(groups) or k < work.decode_steps:
        has = {PREFILL: g < len(groups), DECODE: k < work.decode_steps}
        phase = min((p for p in (DECODE, PREFILL) if has[p]), key=lambda p: t[p])
        other = DECODE if phase == PREFILL else PREFILL
        both = Work(decode=(work.decode_batch, work.context), prefill_tokens=work.prompt_tokens,
                    prefill_groups_left=len(groups) - g)
        if handoff or last[phase] is UNSET and last[other] is UNSET:
            now = Work(decode=both.decode if has[DECODE] else None,
                       prefill_tokens=both.prefill_tokens if has[PREFILL] else None,
                       prefill_groups_left=both.prefill_groups_left)
            split = policy.decide(now).split if handoff else policy.decide(both).split
        else:  # static: the split chosen at the start, to the end
            split = last[phase] if last[phase] is not UNSET else last[other]
        after_other = last[other] is not UNSET and (split is None or last[other] != split)
        start = max(t[phase], t[other]) if after_other else t[phase]
        corun = split is not None and has[other]
        ms = _estimate(estimator, work, phase, g if phase == PREFILL else k, split, corun)
        out.append(Launch(phase, g if phase == PREFILL else k, split, start, start + ms, corun, after_other))
        t[phase], last[phase] = start + ms, split
        if phase == PREFILL:
            g += 1
        else:
            k += 1
    return out


def _estimate(estimator: Estimator, work: MixWork, phase: str, index: int, split: SMSplit | None, corun: bool) -> float:
    sms = estimator.sm_count if split is None else split[phase]
    if phase == PREFILL:
        alone = estimator.prefill_group_ms(work.prompt_tokens, estimator.groups[index], sms)
    else:
        alone = estimator.decode_ms(work.decode_batch, work.context, sms)
    return estimator.corun(alone, phase, split[DECODE]).ms if corun else alone.ms


def makespan(launches: list[Launch]) -> float:
    return max((launch.end_ms for launch in launches), default=0.0)


def sequential_ms(work: MixWork, estimator: Estimator) -> float:
    """The prefill and then the decode steps, each on the whole GPU."""
    n = estimator.sm_count
    return estimator.prefill_ms(work.prompt_tokens, n).ms + work.decode_steps * estimator.decode_ms(
        work.decode_batch, work.context, n).ms


def sm_time_bound(work: MixWork, estimator: Estimator, splits: list[SMSplit]) -> dict:
    """The best co-location can do: prefill SM-time on the whole GPU plus decode SM-time at its
    most SM-efficient lane size (among the candidates and the whole GPU), over the GPU's SMs.
    Returns ``{"ms", "decode_sms", "speedup_vs_sequential"}``."""
    n = estimator.sm_count
    prefill_sm_ms = estimator.prefill_ms(work.prompt_tokens, n).ms * n
    sizes = sorted({s[DECODE] for s in splits} | {n})
    per = {m: estimator.decode_ms(work.decode_batch, work.context, m).ms * m for m in sizes}
    best = min(per, key=per.get)
    bound = (prefill_sm_ms + work.decode_steps * per[best]) / n
    # Neither lane can finish faster than it runs alone on the whole GPU.
    bound = max(bound, estimator.prefill_ms(work.prompt_tokens, n).ms,
                work.decode_steps * estimator.decode_ms(work.decode_batch, work.context, n).ms)
    return {"ms": bound, "decode_sms": best, "speedup_vs_sequential": sequential_ms(work, estimator) / bound}
