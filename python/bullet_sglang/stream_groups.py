"""SGLang's stream groups filled with bullet_kernels lanes, and the group each iteration runs on.

SGLang 0.5.15's PD-multiplexing keeps a list of (prefill stream, decode stream) pairs, "stream
groups": the first is the whole GPU for prefill alone, the last the whole GPU for decode alone,
and those between are SM splits. Decode graphs are captured once per group and a replay picks
the set of the current group; the scheduler switches groups only with both streams idle (a new
prefill admitted or merged, or the decode batch ran dry). The adapter fills that list with our
verified lanes, one group per candidate split, and chooses the group with our SLO policy instead
of pdmux's own rule (a decode-batch-size threshold its code calls a demo).

Pure logic: no SGLang, no GPU. :mod:`.scheduler` applies it inside SGLang.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from bullet_kernels.orchestrate import Work
from bullet_kernels.orchestrate.policy import Policy, check_splits
from bullet_kernels.partition import SMSplit

PREFILL_ALONE = 0  # the first group: the whole GPU, prefill only


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """The stream groups: whole GPU for prefill, one per split, whole GPU for decode."""

    splits: tuple[SMSplit, ...]
    sm_count: int

    def __post_init__(self):
        object.__setattr__(self, "splits", tuple(check_splits(self.splits)))
        for s in self.splits:
            if s["prefill"] + s["decode"] > self.sm_count:
                raise ValueError(f"split {s} needs {s['prefill'] + s['decode']} SMs; the GPU has {self.sm_count}")

    @property
    def size(self) -> int:
        return len(self.splits) + 2

    @property
    def decode_alone(self) -> int:
        return len(self.splits) + 1

    def sm_counts(self) -> list[tuple[int, int]]:
        """(prefill SMs, decode SMs) of each group, in SGLang's order."""
        return [(self.sm_count, 0), *((s["prefill"], s["decode"]) for s in self.splits), (0, self.sm_count)]

    def index_of(self, split: SMSplit) -> int:
        try:
            return self.splits.index(split) + 1
        except ValueError:
            raise ValueError(f"split {split} is not one of the stream groups' {[str(s) for s in self.splits]}") from None


def groups_left(layers_done: int, num_layers: int, policy_groups: int) -> int:
    """The policy's layer groups still to run when ``layers_done`` of ``num_layers`` are (SGLang
    advances a split prefill by layers, the profile counts in its own groups)."""
    if not 0 <= layers_done <= num_layers or num_layers < 1 or policy_groups < 1:
        raise ValueError(f"bad prefill progress: {layers_done} of {num_layers} layers, {policy_groups} groups")
    return math.ceil((num_layers - layers_done) * policy_groups / num_layers)


def choose_group(plan: GroupPlan, policy: Policy, decode: tuple[int, int] | None,
                 prefill_tokens: int | None, prefill_groups_left: int = 0,
                 ttft_left_ms: float | None = None) -> int:
    """The stream group of the next iteration: a split chosen by ``policy`` while both phases
    have work, the whole GPU for the phase that has work alone (prefill's when neither has)."""
    if decode is None:
        return PREFILL_ALONE
    if prefill_tokens is None:
        return plan.decode_alone
    decision = policy.decide(Work(decode=decode, prefill_tokens=prefill_tokens,
                                  prefill_groups_left=max(prefill_groups_left, 1), ttft_left_ms=ttft_left_ms))
    if decision.split is None:
        raise ValueError(f"the policy gave no split while both phases have work ({decision.reason})")
    return plan.index_of(decision.split)


def candidate_splits(texts: Sequence[str]) -> tuple[SMSplit, ...]:
    return tuple(SMSplit.parse(t) for t in texts)
