"""Start-up verification of a PartitionSet against what the probe observed (pure logic).

A backend must never hand out a partition that does not hold: if kernels escape their lane,
or lanes promised to be disjoint share an SM, we refuse with an error naming the driver
version and what the probe saw.
"""

from __future__ import annotations

from typing import Callable

from ..errors import PartitionVerificationError
from . import probe
from .base import Lane, PartitionSet, format_ranges


def check_lanes(lanes: dict[str, Lane], sm_count: int, disjoint: bool, backend: str, driver: str) -> None:
    """Raise PartitionVerificationError if ``observed_sms`` break the lanes' promises."""
    problems: list[str] = []
    undercounts = 0  # problems that are only a lane on fewer SMs than granted
    for lane in lanes.values():
        seen = lane.observed_sms
        if any(not 0 <= sm < sm_count for sm in seen):
            problems.append(f"lane {lane.name!r} ran on SM ids outside 0..{sm_count - 1}: {format_ranges(sorted(seen))}")
        if lane.expected_sms is not None and not seen <= lane.expected_sms:
            escaped = sorted(seen - lane.expected_sms)
            problems.append(
                f"lane {lane.name!r} escaped its mask: ran on SMs {format_ranges(escaped)} outside "
                f"the {len(lane.expected_sms)} it was given"
            )
        if len(seen) != lane.granted:
            undercounts += len(seen) < lane.granted
            problems.append(
                f"lane {lane.name!r} was granted {lane.granted} SMs but the probe ran on {len(seen)} "
                f"({format_ranges(sorted(seen))})"
            )
    if disjoint:
        names = list(lanes)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                shared = lanes[a].observed_sms & lanes[b].observed_sms
                if shared and not (lanes[a].whole_gpu or lanes[b].whole_gpu):
                    problems.append(
                        f"lanes {a!r} and {b!r} were promised disjoint but share SMs {format_ranges(sorted(shared))}"
                    )
    if problems:
        hint = ""
        if backend == "green" and undercounts == len(problems):
            # measured on the H200, driver 580 (docs/green-contexts.md)
            hint = (" A green lane on fewer SMs than granted is what the driver does when the lane shares SMs "
                    "with a lane of another open set that has run work (docs/green-contexts.md): if other "
                    "splits are open, open every split before running work (EngineConfig.splits), release "
                    "splits no longer used (Partitioner.release), or use backend='tpc'.")
        raise PartitionVerificationError(
            f"{backend} partition failed verification on driver {driver}: " + "; ".join(problems)
            + ". Refusing to run unpartitioned; try another backend (bullet info lists them)." + hint,
            undercount_only=undercounts == len(problems),
        )


def probe_and_check(pset: PartitionSet) -> None:
    """Run the %smid probe on every lane of ``pset``, record what it saw, and check the promises."""
    d = pset.device
    for lane in pset.lanes.values():
        with pset.lane_scope(lane.name):
            lane.observed_sms = probe.observed_sms(lane.stream, d.sm_count, d.index)
    check_lanes(pset.lanes, d.sm_count, pset.disjoint, pset.backend, d.driver_api_version_str)


def open_verified(build: Callable[[], PartitionSet], release: Callable[[], None], verify: bool = True) -> PartitionSet:
    """``build()`` a PartitionSet and (by default) probe it; on any failure ``release()`` what
    was created before raising, so a refused partition leaves no streams or contexts behind."""
    check = probe_and_check if verify else (lambda pset: None)
    return open_verified_retrying(build, release, release, 1, check=check)[0]


def open_verified_retrying(
    build: Callable[[], PartitionSet],
    release: Callable[[], None],
    set_aside: Callable[[], None],
    attempts: int,
    check: Callable[[PartitionSet], None] = probe_and_check,
    settle: int = 0,
) -> tuple[PartitionSet, list[str]]:
    """``build()`` and ``check()`` a PartitionSet; a set that fails verification is ``set_aside()``
    (its resources kept, not released, so a rebuild cannot be handed the same ones) and built
    again, up to ``attempts`` sets. Returns the verified set and the refusals before it; raises
    PartitionVerificationError naming every refusal when all fail. Any other error releases the
    set being built and propagates.

    ``settle``: a set whose only problem is lanes on fewer SMs than granted is probed again, up
    to ``settle`` more times, before it is set aside; it is handed out only after a probe finds
    every promise kept (an escape or overlap is never re-probed). The experiment for green
    contexts whose first launches run on an earlier context's SMs (docs/green-contexts.md)."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if settle < 0:
        raise ValueError(f"settle must be >= 0 re-probes, got {settle}")
    failures: list[str] = []
    for _ in range(attempts):
        try:
            pset = build()
            _check_settling(pset, check, settle, failures)
        except PartitionVerificationError as exc:
            failures.append(str(exc))
            set_aside()
            continue
        except BaseException:
            release()
            raise
        return pset, failures
    raise PartitionVerificationError(
        f"{failures[-1]} (refused {attempts} times, each time with fresh resources; earlier: "
        + " | ".join(failures[:-1]) + ")" if len(failures) > 1 else failures[-1]
    )


def _check_settling(pset: PartitionSet, check: Callable[[PartitionSet], None], settle: int,
                    failures: list[str]) -> None:
    """``check(pset)``, probed again up to ``settle`` times while it fails by undercounts only;
    each such failure is recorded (prefixed) before the next probe; the last one raises."""
    for probes_left in range(settle, -1, -1):
        try:
            check(pset)
            return
        except PartitionVerificationError as exc:
            if probes_left == 0 or not exc.undercount_only:
                raise
            failures.append(f"(probed again) {exc}")
