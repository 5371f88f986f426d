"""The green cross-lane reproduction (docs/green-contexts.md), one scenario per process.

``BULLET_SCENARIO=late``: splits are opened one after another while Inductor-compiled graphs
run on the earlier ones (what bench_compile did at fa48be4). On the H200 (driver 580) a growing
lane then usually ran on the earlier, smaller lane's SMs; verification refuses such a set and
makes it again (up to three sets), so the split is either verified or refused, never misplaced.
``BULLET_SCENARIO=upfront``: the same work, but every split is opened and verified first (what
``EngineConfig.splits`` does); every lane and every captured graph must then hold.
``BULLET_SCENARIO=released``: opened late as in ``late``, but each split is released
(``Partitioner.release``) once its work is done, before the next opens: measured with the
same sequence unverified (bench/investigations/green_variants.py ``close``, H200 at 50405b6),
no probe then lost an SM, so every split must verify at its first attempt.
tests/test_green_cross_lane_gpu.py runs this file; not collected by a plain ``pytest``.
"""

from __future__ import annotations

import os

import pytest

from bench.investigations.green_cause import SPLITS, work
from bullet_kernels import BulletError, Partitioner
from bullet_kernels.partition import probe

pytestmark = pytest.mark.gpu


def _assert_no_lane_escapes(parts: Partitioner) -> None:
    """After the work, every lane's probe stays within the lane's own SMs. (It may run on fewer:
    measured, the decode lane of the first split then ran on 16 of its 36 SMs; see the doc.)"""
    from bullet_kernels.partition.base import format_ranges

    for pset in parts.open_sets():
        for lane in pset.lanes.values():
            seen = probe.observed_sms(lane.stream, pset.device.sm_count)
            print(f"after work: {pset.split.key}:{lane.name} granted {lane.granted} observed {len(seen)} "
                  f"({format_ranges(sorted(seen))}); lane {format_ranges(sorted(lane.observed_sms))}")
            assert seen <= lane.observed_sms, (pset.split.key, lane.name, sorted(seen - lane.observed_sms))


def test_scenario():
    scenario = os.environ.get("BULLET_SCENARIO", "")
    with Partitioner("green") as parts:
        if scenario == "upfront":
            for split in SPLITS:
                parts.get(split)
            work(parts)
            _assert_no_lane_escapes(parts)
        elif scenario == "late":
            # Measured on the H200 (docs/green-contexts.md): a late split usually fails its probe;
            # it is made again up to three times. Either it is refused, naming every attempt, or
            # a verified set is used; never a set that ran on other SMs than it verified on.
            try:
                work(parts)
                print(f"late splits verified; made again after refusals: {parts.backend.reopened}")
            except BulletError as err:
                assert "failed verification" in str(err) and "refused 3 times" in str(err), err
                print(f"refused after three fresh sets, as measured before: {err}")
            _assert_no_lane_escapes(parts)
        elif scenario == "released":
            opened = []

            def release_previous(split):  # before the next split's contexts are made
                if opened:
                    parts.release(opened[-1])
                opened.append(split)

            work(parts, before_open=release_previous)
            assert parts.backend.reopened == [], parts.backend.reopened  # every split verified at once
            _assert_no_lane_escapes(parts)
        else:
            pytest.fail(f"BULLET_SCENARIO must be 'upfront', 'late' or 'released', got {scenario!r}")
