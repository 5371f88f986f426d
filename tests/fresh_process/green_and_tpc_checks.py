"""Green and tpc lanes in one process: green first, then tpc with the stream record, then
green again. The record subscribes no launch callback, so the driver keeps creating green
contexts (measured on the H200, driver 580). tests/test_tpc_gpu.py runs this file in a fresh
process, so no earlier test can have installed the hook; not collected by a plain ``pytest``.
"""

from __future__ import annotations

import pytest

from bullet_kernels.partition import Partitioner, SMSplit, hook_state, probe
from bullet_kernels.partition.tpc import diagnostics

pytestmark = pytest.mark.gpu


def _holds(pset) -> None:
    """A fresh probe on every lane runs on exactly its granted number of SMs."""
    n = pset.device.sm_count
    for lane in pset.lanes.values():
        seen = probe.observed_sms(lane.stream, n)
        assert len(seen) == lane.granted, (pset.backend, lane.name, sorted(seen))
        if lane.expected_sms is not None:
            assert seen == lane.expected_sms


def test_green_then_tpc_record_then_green_again(monkeypatch):
    monkeypatch.delenv("BULLET_TPC_MECHANISM", raising=False)
    assert not hook_state.hook_installed()
    with Partitioner("green") as green, Partitioner("tpc") as tpc:
        first = green.get(SMSplit(prefill=96, decode=36))
        assert tpc.backend.mechanism == "record"
        lanes = tpc.get(SMSplit(prefill=64, decode=68))
        assert not lanes.needs_scope
        assert not hook_state.hook_installed() and diagnostics.hook_stats()["installed"] == 0
        again = green.get(SMSplit(prefill=104, decode=28))  # new green contexts after tpc lanes
        for pset in (first, lanes, again):
            _holds(pset)
