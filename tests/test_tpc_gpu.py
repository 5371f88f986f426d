"""TPC-mask backend on a real GPU: lanes hold, graphs keep the mask they were captured with, and
the launch hook writes descriptors. Run on the GPU machine: ``pytest -m gpu tests/test_tpc_gpu.py``.

Several tests assert *measured* driver behaviour (tpc-masks.md, H100, driver 580), e.g. that a
graph captured unmasked ignores masks at replay; if one fails after a driver update, the
behaviour changed: update tpc-masks.md and the graph bank's assumptions, not just the test.
"""

from __future__ import annotations

import pytest
import torch

from bullet_kernels.partition import SMSplit, get_backend, probe
from bullet_kernels.partition.tpc_mask import TpcMap, TpcMask

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """One backend whose TPC map is probed fresh (an empty cache dir), not read from a cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BULLET_CACHE_DIR", str(tmp_path_factory.mktemp("tpc_cache")))
    try:
        yield get_backend("tpc")
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def sm_count(backend) -> int:
    return backend.device.sm_count


def _probe_out(sm_count: int, waves: int = 4) -> torch.Tensor:
    out = torch.full((waves * sm_count,), -1, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()  # the fill must land before a probe on another stream writes
    return out


def _replay_sms(graph: torch.cuda.CUDAGraph, stream, out: torch.Tensor) -> frozenset[int]:
    """SMs a graph of probe launches ran on when replayed on ``stream``."""
    out.fill_(-1)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.replay()
    stream.synchronize()
    return probe.sms_written(out)


def _capture_probe(stream, out: torch.Tensor) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        probe.launch_probe(stream, out)
    return graph


def test_probed_map_is_consistent(backend, sm_count):
    tmap = backend.tpc_map()
    assert tmap.problems() == []
    assert tmap.tpc_count == backend.device.tpc_count
    if "H100" in backend.device.name:  # measured: bits are logical TPC ids, b -> SMs 2b, 2b+1
        assert tmap.bits == TpcMap.linear(sm_count).bits


@pytest.mark.parametrize("text", ["prefill=96,decode=36", "prefill=104,decode=28", "decode=16", "decode=132"])
def test_each_lane_runs_on_exactly_its_sms(backend, sm_count, text):
    with backend.open(SMSplit.parse(text)) as pset:
        for lane in pset.lanes.values():
            observed = probe.observed_sms(lane.stream, sm_count)  # a fresh probe, not open()'s
            assert observed == lane.expected_sms, (lane.name, sorted(observed))
            assert len(observed) == lane.granted
        seen = [lane.expected_sms for lane in pset.lanes.values()]
        if len(seen) == 2:
            assert not seen[0] & seen[1]


def test_overlapping_lanes_share_exactly_the_expected_sms(backend, sm_count):
    with backend.open(SMSplit(prefill=100, decode=64, overlap=True)) as pset:
        p, d = pset.lane("prefill"), pset.lane("decode")
        seen_p, seen_d = probe.observed_sms(p.stream, sm_count), probe.observed_sms(d.stream, sm_count)
        assert (seen_p, seen_d) == (p.expected_sms, d.expected_sms)
        assert seen_p & seen_d == p.expected_sms & d.expected_sms
        assert len(seen_p & seen_d) == 100 + 64 - sm_count


def test_graph_captured_on_a_masked_lane_keeps_it_on_a_full_gpu_stream(backend, sm_count):
    with backend.open(SMSplit(prefill=96, decode=36)) as pset:
        lane = pset.lane("decode")
        out = _probe_out(sm_count)
        graph = _capture_probe(lane.stream, out)
        assert _replay_sms(graph, torch.cuda.Stream(), out) == lane.expected_sms


def test_graph_captured_unmasked_ignores_replay_stream_mask_and_next_launch_mask(backend, sm_count):
    everything = frozenset(range(sm_count))
    plain = torch.cuda.Stream()
    out = _probe_out(sm_count)
    graph = _capture_probe(plain, out)
    with backend.open(SMSplit(decode=16)) as pset:
        # measured on driver 580: the mask of the stream a graph is replayed on is ignored
        assert _replay_sms(graph, pset.stream("decode"), out) == everything
    out.fill_(-1)
    torch.cuda.synchronize()  # no kernel may launch between setting the mask and the replay
    writes = backend.hook_stats()["writes"]
    with backend.next_launch_mask(TpcMask.range(0, 4)):
        with torch.cuda.stream(plain):
            graph.replay()
    plain.synchronize()
    # measured: replays do not run the launch hook, so the pending mask is neither used nor consumed
    assert probe.sms_written(out) == everything
    assert backend.hook_stats()["writes"] == writes


def test_next_launch_mask_restricts_one_launch_and_counts_a_write(backend, sm_count):
    mask = TpcMask.range(0, 4)
    expected = backend.tpc_map().sms(mask)
    stream = torch.cuda.Stream()
    first, second = _probe_out(sm_count), _probe_out(sm_count)
    stats0 = backend.hook_stats()  # installs nothing; next_launch_mask installs the hook
    with backend.next_launch_mask(mask):
        probe.launch_probe(stream, first)  # nothing else may launch in between
        probe.launch_probe(stream, second)  # the mask was consumed by the first launch
    stream.synchronize()
    stats = backend.hook_stats()
    info = f"hook stats before {stats0}, after {stats}"
    assert stats["installed"] == 1 and stats["writes"] > stats0["writes"], info
    assert stats["last_params_size"] >= 40, info
    assert probe.sms_written(first) == expected, info
    assert probe.sms_written(second) == frozenset(range(sm_count)), info


def test_global_mask_restricts_unmasked_streams_but_not_lanes(backend, sm_count):
    mask = TpcMask.range(0, 8)
    with backend.open(SMSplit(decode=36)) as pset:
        lane = pset.lane("decode")
        with backend.global_mask(mask):
            plain = probe.observed_sms(torch.cuda.Stream(), sm_count)
            in_lane = probe.observed_sms(lane.stream, sm_count)
        after = probe.observed_sms(torch.cuda.Stream(), sm_count)
    assert plain == backend.tpc_map().sms(mask), backend.hook_stats()
    assert in_lane == lane.expected_sms, backend.hook_stats()  # a stream mask wins over the global one
    assert after == frozenset(range(sm_count))


def test_masked_stream_rewrites_and_restores_its_record(backend, sm_count):
    from bullet_kernels.partition import tpc_native

    lib, tmap, small = tpc_native.load(), backend.tpc_map(), TpcMask.range(0, 8)
    ms = backend.new_stream()
    try:
        ms.set(small)
        assert lib.read_record(ms.handle, ms.offset) == [1, *small.disabled_words()]
        assert probe.observed_sms(ms.stream, sm_count) == tmap.sms(small)
        ms.set(tmap.live)  # a later write passes the "record still holds what we wrote" check
        assert probe.observed_sms(ms.stream, sm_count) == frozenset(range(sm_count))
    finally:
        ms.close()  # restores the empty record, then destroys the stream
    assert ms.handle is None
