"""TPC-mask backend on a real GPU: lanes hold exactly their SMs, the launch hook writes
descriptors, and graphs behave as measured. Run on the GPU machine: ``pytest -m gpu tests/test_tpc_gpu.py``.

Several tests assert *measured* driver behaviour (docs/tpc-masks-h100.md, H100, driver 580),
e.g. that a hook mask applies when a graph is replayed, not when it is captured; if one fails
after a driver update, the behaviour changed: update the doc and the graph bank's assumptions,
not just the test.
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


def _hook_only(backend):
    if backend.mechanism != "hook":
        pytest.skip(f"measured behaviour of the launch-hook mechanism; this driver uses {backend.mechanism!r}")


def _record_only(backend):
    if backend.mechanism != "record":
        pytest.skip(f"needs the driver stream-record mechanism; this driver uses {backend.mechanism!r}")


def test_probed_map_is_consistent(backend, sm_count):
    tmap = backend.tpc_map()
    assert tmap.problems() == []
    assert tmap.tpc_count == backend.device.tpc_count
    assert {len(sms) for sms in tmap.bits if sms} == {2}  # every live bit is one TPC of 2 SMs


def test_h100_driver_13000_uses_the_hook_and_physical_bits(backend, sm_count):
    d = backend.device
    if "H100" not in d.name or d.driver_api_version != 13000:
        pytest.skip("measured on an H100 with driver API 13000")
    assert backend.mechanism == "hook"  # the table offset 0x51c is refuted there
    # measured: descriptor bits are physical TPC ids with floorswept gaps (bit 1 -> SMs 16, 17)
    assert backend.tpc_map().bits != TpcMap.linear(sm_count).bits
    assert max(backend.tpc_map().live_bits) > sm_count // 2


@pytest.mark.parametrize("text", ["prefill=96,decode=36", "prefill=104,decode=28", "decode=16", "decode=132"])
def test_each_lane_runs_on_exactly_its_sms(backend, sm_count, text):
    with backend.open(SMSplit.parse(text)) as pset:
        for name, lane in pset.lanes.items():
            with pset.lane_scope(name):
                observed = probe.observed_sms(lane.stream, sm_count)  # a fresh probe, not open()'s
            assert observed == lane.expected_sms, (lane.name, sorted(observed))
            assert len(observed) == lane.granted
        seen = [lane.expected_sms for lane in pset.lanes.values()]
        if len(seen) == 2:
            assert not seen[0] & seen[1]


def test_overlapping_lanes_share_exactly_the_expected_sms(backend, sm_count):
    with backend.open(SMSplit(prefill=100, decode=64, overlap=True)) as pset:
        p, d = pset.lane("prefill"), pset.lane("decode")
        with pset.lane_scope("prefill"):
            seen_p = probe.observed_sms(p.stream, sm_count)
        with pset.lane_scope("decode"):
            seen_d = probe.observed_sms(d.stream, sm_count)
        assert (seen_p, seen_d) == (p.expected_sms, d.expected_sms)
        assert seen_p & seen_d == p.expected_sms & d.expected_sms
        assert len(seen_p & seen_d) == 100 + 64 - sm_count


def test_hook_lanes_mask_the_launching_thread_not_the_stream(backend, sm_count):
    _hook_only(backend)
    everything = frozenset(range(sm_count))
    with backend.open(SMSplit(prefill=96, decode=36)) as pset:
        lane = pset.lane("decode")
        # measured: the callback's params do not name the stream, so outside the scope the
        # lane's own stream runs on every SM (documented: use PartitionSet.use / lane_scope)
        assert probe.observed_sms(lane.stream, sm_count) == everything
        with pset.use("decode"):
            assert probe.observed_sms(torch.cuda.Stream(), sm_count) == lane.expected_sms


def _capture_in_lane(pset, name, out) -> torch.cuda.CUDAGraph:
    """Capture a probe launch the way the graph bank does: on the lane's stream, in its scope, uploaded there."""
    from bullet_kernels.graph_bank import capture_on_stream

    lane = pset.lane(name)
    with pset.lane_scope(name):
        graph, _ = capture_on_stream(lambda: probe.launch_probe(lane.stream, out), lane.stream, lane.granted, None, warmup=0)
    return graph


def test_graph_captured_on_a_lane_keeps_it_on_a_full_gpu_stream(backend, sm_count):
    with backend.open(SMSplit(prefill=96, decode=36)) as pset:
        lane = pset.lane("decode")
        out = _probe_out(sm_count)
        graph = _capture_in_lane(pset, "decode", out)
        assert _replay_sms(graph, torch.cuda.Stream(), out) == lane.expected_sms
        with pset.lane_scope("prefill"):  # measured (hook): the mask written at upload sticks
            assert _replay_sms(graph, pset.stream("prefill"), out) == lane.expected_sms


def test_graph_captured_unmasked_ignores_the_lane_it_is_replayed_on(backend, sm_count):
    from bullet_kernels.graph_bank import capture_on_stream

    everything = frozenset(range(sm_count))
    plain = torch.cuda.Stream()
    out = _probe_out(sm_count)
    graph, _ = capture_on_stream(lambda: probe.launch_probe(plain, out), plain, sm_count, None, warmup=0)
    with backend.open(SMSplit(decode=16)) as pset:
        # record: the replay stream's mask is ignored (tpc-masks.md); hook: the unmasked
        # descriptors written at upload stick (docs/tpc-masks-h100.md)
        with pset.use("decode"):
            assert _replay_sms(graph, pset.stream("decode"), out) == everything


def test_next_launch_mask_restricts_one_launch_and_counts_a_write(backend, sm_count):
    tmap = backend.descriptor_map()
    mask = tmap.mask_for(range(0, 4))
    expected = tmap.sms(mask)
    stream = torch.cuda.Stream()
    first, second = _probe_out(sm_count), _probe_out(sm_count)
    stats0 = backend.hook_stats()
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


def test_global_mask_restricts_launches_outside_lanes(backend, sm_count):
    tmap = backend.descriptor_map()
    mask = tmap.mask_for(range(0, 8))
    with backend.open(SMSplit(decode=36)) as pset:
        lane = pset.lane("decode")
        with backend.global_mask(mask):
            plain = probe.observed_sms(torch.cuda.Stream(), sm_count)
            with pset.lane_scope("decode"):
                in_lane = probe.observed_sms(lane.stream, sm_count)
        after = probe.observed_sms(torch.cuda.Stream(), sm_count)
    assert plain == tmap.sms(mask), backend.hook_stats()
    assert in_lane == lane.expected_sms, backend.hook_stats()  # a lane's mask wins over the global one
    assert after == frozenset(range(sm_count))


def test_masked_stream_rewrites_and_restores_its_record(backend, sm_count):
    _record_only(backend)
    from bullet_kernels.partition import tpc_native

    lib, tmap = tpc_native.load(), backend.tpc_map()
    small = tmap.mask_for(range(0, 8))
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


def test_gemm_throughput_rises_with_tpc_lane_size(backend, sm_count):
    from test_partition_gpu import _gemm_tflops

    rates = []
    for sms in (16, 64, sm_count):
        with backend.open(SMSplit(decode=sms)) as pset, pset.lane_scope("decode"):
            rates.append(_gemm_tflops(pset.stream("decode")))
    # 4x more SMs should give far more than 2x; a lane that did not hold would be flat.
    assert rates[0] * 2 < rates[1] < rates[2] * 1.05, rates
