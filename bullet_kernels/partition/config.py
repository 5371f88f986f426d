"""SM split configurations and the rules each backend uses to grant them (pure logic, no GPU).

An :class:`SMSplit` names one lane per phase and how many SMs it asks for, e.g.
``SMSplit(prefill=96, decode=36)``. It is immutable and hashable: the graph bank keys
captured graphs by it, because a graph keeps the SM restriction it was captured with.
"""

from __future__ import annotations

import re
from typing import Iterator

from ..errors import InvalidSplitError

_LANE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class SMSplit:
    """How many SMs each named lane asks for. ``overlap=True`` lets lanes share SMs (tpc only)."""

    __slots__ = ("_lanes", "_overlap")

    def __init__(self, *, overlap: bool = False, **lanes: int):
        if not lanes:
            raise InvalidSplitError(
                "an SMSplit needs at least one lane, e.g. SMSplit(prefill=96, decode=36)"
            )
        for name, sms in lanes.items():
            if not _LANE_NAME.match(name):
                raise InvalidSplitError(
                    f"lane name {name!r} is not allowed: use lower-case letters, digits and '_'"
                )
            if isinstance(sms, bool) or not isinstance(sms, int):
                raise InvalidSplitError(
                    f"lane {name!r} asks for {sms!r} SMs: the count must be a positive int"
                )
            if sms <= 0:
                raise InvalidSplitError(
                    f"lane {name!r} asks for {sms} SMs: the count must be at least 1 "
                    "(leave a lane out instead of giving it 0)"
                )
        self._lanes = tuple(lanes.items())
        self._overlap = bool(overlap)

    @classmethod
    def parse(cls, text: str) -> "SMSplit":
        """``"prefill=96,decode=36"`` (``+overlap`` appended allows sharing) -> SMSplit."""
        overlap = text.endswith("+overlap")
        body = text[: -len("+overlap")] if overlap else text
        lanes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in body.split(","))):
            name, sep, value = part.partition("=")
            if not sep or not value.strip().lstrip("-").isdigit():
                raise InvalidSplitError(
                    f"cannot read {part!r} in split {text!r}: write lane=SMS pairs, e.g. prefill=96,decode=36"
                )
            name = name.strip()
            if name in lanes:
                raise InvalidSplitError(
                    f"lane {name!r} appears twice in split {text!r}: name each lane once, e.g. prefill=96,decode=36"
                )
            lanes[name] = int(value)
        return cls(overlap=overlap, **lanes)

    @property
    def overlap(self) -> bool:
        return self._overlap

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self._lanes)

    @property
    def total(self) -> int:
        return sum(s for _, s in self._lanes)

    def items(self) -> Iterator[tuple[str, int]]:
        return iter(self._lanes)

    def __getitem__(self, lane: str) -> int:
        for n, s in self._lanes:
            if n == lane:
                return s
        raise KeyError(f"split {self} has no lane {lane!r}; lanes: {', '.join(self.names)}")

    def __contains__(self, lane: object) -> bool:
        return lane in self.names

    @property
    def key(self) -> str:
        """Short stable name, e.g. ``prefill96-decode36`` (used in file names and tables)."""
        return "-".join(f"{n}{s}" for n, s in self._lanes) + ("+overlap" if self._overlap else "")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SMSplit) and (self._lanes, self._overlap) == (other._lanes, other._overlap)

    def __hash__(self) -> int:
        return hash((self._lanes, self._overlap))

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={s}" for n, s in self._lanes)
        return f"SMSplit({args}{', overlap=True' if self._overlap else ''})"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_fits(split: SMSplit, sm_count: int) -> None:
    for name, sms in split.items():
        if sms > sm_count:
            raise InvalidSplitError(
                f"lane {name!r} asks for {sms} SMs but this GPU has {sm_count}; allowed: 1..{sm_count}"
            )


def grant_green(split: SMSplit, sm_count: int, min_sms: int = 8, align: int = 8) -> dict[str, int]:
    """SMs each lane gets from green contexts.

    The driver grants SM groups of at least ``min_sms`` in multiples of ``align``, carved one
    after another; whatever is left over (the remainder) can be given whole to one lane. So:
    a lane asking for the whole GPU gets an unrestricted stream; other lanes are rounded up to
    the alignment; if that over-subscribes the GPU, one lane may take the exact remainder
    instead (that is how 96 + 36 fits 132 SMs). Green contexts never overlap.
    """
    if split.overlap:
        raise InvalidSplitError(
            f"{split}: green contexts cannot overlap; use backend='tpc' for overlapping lanes"
        )
    _check_fits(split, sm_count)
    whole = {n: sm_count for n, s in split.items() if s == sm_count}
    if whole and len(split.names) > 1:
        raise InvalidSplitError(
            f"{split}: lane {next(iter(whole))!r} takes the whole GPU, so no SMs are left for the "
            "others; green lanes must be disjoint (use backend='tpc' with overlap=True to share)"
        )
    if whole:
        return whole
    rounded = {n: max(min_sms, _round_up(s, align)) for n, s in split.items()}
    if sum(rounded.values()) <= sm_count:
        return rounded
    # Try giving one lane the exact remainder; prefer the lane that loses the least slack.
    for name, _ in sorted(split.items(), key=lambda kv: rounded[kv[0]] - kv[1], reverse=True):
        rest = sum(v for n, v in rounded.items() if n != name)
        remainder = sm_count - rest
        if remainder >= split[name]:
            return {**rounded, name: remainder}
    pretty = ", ".join(f"{n} {s}->{rounded[n]}" for n, s in split.items())
    raise InvalidSplitError(
        f"{split} does not fit {sm_count} SMs with green contexts: lanes are granted in multiples "
        f"of {align} SMs (at least {min_sms}), one lane may take the remainder ({pretty}); "
        f"ask for at most {sm_count} SMs in total"
    )


def grant_tpc(split: SMSplit, sm_count: int, sms_per_tpc: int = 2) -> dict[str, int]:
    """SMs each lane gets from TPC masks: rounded up to whole TPCs (2 SMs).

    Lanes must fit side by side unless ``split.overlap``; overlapping splits have exactly two
    lanes (the first is placed from the lowest TPC up, the second from the highest down).
    """
    _check_fits(split, sm_count)
    granted = {n: min(sm_count, _round_up(s, sms_per_tpc)) for n, s in split.items()}
    total = sum(granted.values())
    if total > sm_count:
        if not split.overlap:
            raise InvalidSplitError(
                f"{split} asks for {total} SMs (rounded to whole TPCs of {sms_per_tpc}) but this GPU "
                f"has {sm_count}; ask for at most {sm_count} in total, or pass overlap=True to let "
                "two lanes share SMs"
            )
        if len(granted) != 2:
            raise InvalidSplitError(
                f"{split}: overlapping splits must have exactly two lanes, got {len(granted)}"
            )
    return granted
