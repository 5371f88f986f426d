"""TPC-mask backend on a real GPU. Run on the GPU machine: ``pytest -m gpu tests/test_tpc_gpu.py``.

In this process: the stream-record mechanism (the default wherever it verifies), which
subscribes no launch callback and so leaves green contexts usable for the other test files.
Checks that need the launch hook, or a process no earlier test touched, run in a fresh Python
process (tests/fresh_process/): once the hook is installed, the driver refuses green contexts
for the rest of the process.

Several tests assert *measured* driver behaviour (docs/tpc-masks.md: H200, driver 580). If one
fails after a driver update, the behaviour changed: update the doc and the code that relies
on it, not just the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from bullet_kernels.device import describe_state
from bullet_kernels.partition import SMSplit, available_backends, get_backend, hook_state, probe
from bullet_kernels.partition.tpc import mechanism, native
from bullet_kernels.partition.tpc.masks import TpcMap

pytestmark = pytest.mark.gpu

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """A tpc backend in auto mode whose maps are probed fresh (an empty cache dir); the tests
    here need the record mechanism and skip where this driver does not get it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BULLET_CACHE_DIR", str(tmp_path_factory.mktemp("tpc_cache")))
    mp.delenv(mechanism.MECHANISM_ENV, raising=False)
    mp.delenv(mechanism.OFFSET_ENV, raising=False)
    try:
        b = get_backend("tpc")
        if b.mechanism != "record":
            pytest.skip(f"this driver gets the {b.mechanism!r} mechanism (tests/fresh_process covers the hook)")
        yield b
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def sm_count(backend) -> int:
    return backend.device.sm_count


def _probe_out(sm_count: int, waves: int = 4) -> torch.Tensor:
    out = torch.full((waves * sm_count,), -1, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()  # the fill must land before a probe on another stream writes
    return out


def _replay(graph: torch.cuda.CUDAGraph, stream, *outs: torch.Tensor) -> list[frozenset[int]]:
    """SMs each probe output of ``graph`` was written from when replayed on ``stream``."""
    for out in outs:
        out.fill_(-1)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.replay()
    stream.synchronize()
    return [probe.sms_written(out) for out in outs]


def _capture_probe(stream, out: torch.Tensor) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        probe.launch_probe(stream, out)
    return graph


def test_h200_driver_13000_gets_the_record_with_logical_bits(backend, sm_count):
    d = backend.device
    if "H200" not in d.name or d.driver_api_version != 13000:
        pytest.skip("measured on an H200 with driver API 13000")
    # measured: the record at *(void**)handle + 0x51c; bit b -> SMs 2b, 2b+1
    assert backend.describe() == "stream record at *(CUstream)+0x51c (logical TPC bits)"
    assert backend.tpc_map().bits == TpcMap.linear(sm_count).bits


def test_probed_map_is_consistent(backend):
    tmap = backend.tpc_map()
    assert tmap.problems() == []
    assert tmap.tpc_count == backend.device.tpc_count
    assert {len(sms) for sms in tmap.bits if sms} == {2}  # every live bit is one TPC of 2 SMs


def test_fresh_streams_read_as_disabled_records(backend):
    lib = native.load()
    offset = mechanism.choose(lib, backend.device.driver_api_version).offset
    pooled = torch.cuda.Stream()
    assert lib.read_record(pooled.cuda_stream, offset) == [0, 0, 0, 0, 0]  # measured on the H200
    ms = backend.new_stream()  # refuses by itself unless its record reads [0, 0, 0, 0, 0]
    try:
        assert lib.read_record(ms.handle, ms.offset) == [0, 0, 0, 0, 0]
    finally:
        ms.close()


SPLITS = ["prefill=96,decode=36", "prefill=104,decode=28", "decode=2", "decode=34", "decode=16", "decode=132",
          "prefill=130,decode=2"]


@pytest.mark.parametrize("text", SPLITS)
def test_each_lane_runs_on_exactly_its_sms(backend, sm_count, text):
    with backend.open(SMSplit.parse(text)) as pset:
        assert not pset.needs_scope
        for lane in pset.lanes.values():
            observed = probe.observed_sms(lane.stream, sm_count)  # a fresh probe, no scope
            assert observed == lane.expected_sms, (lane.name, sorted(observed))
            assert len(observed) == lane.granted
        seen = [lane.expected_sms for lane in pset.lanes.values()]
        if len(seen) == 2:
            assert not seen[0] & seen[1]


def test_record_lanes_hold_for_any_thread_and_leave_other_streams_alone(backend, sm_count):
    with backend.open(SMSplit(decode=16)) as pset:
        lane = pset.lane("decode")
        seen = {}
        worker = threading.Thread(target=lambda: seen.update(sms=probe.observed_sms(lane.stream, sm_count)))
        worker.start()
        worker.join()
        assert seen["sms"] == lane.expected_sms
        assert probe.observed_sms(torch.cuda.Stream(), sm_count) == frozenset(range(sm_count))


def test_overlapping_lanes_share_exactly_the_expected_sms(backend, sm_count):
    with backend.open(SMSplit(prefill=100, decode=64, overlap=True)) as pset:
        p, d = pset.lane("prefill"), pset.lane("decode")
        seen_p = probe.observed_sms(p.stream, sm_count)
        seen_d = probe.observed_sms(d.stream, sm_count)
        assert (seen_p, seen_d) == (p.expected_sms, d.expected_sms)
        assert len(seen_p & seen_d) == 100 + 64 - sm_count


def test_graph_captured_on_a_lane_keeps_it_on_any_replay_stream(backend, sm_count):
    with backend.open(SMSplit(prefill=96, decode=36)) as pset:
        lane = pset.lane("decode")
        out = _probe_out(sm_count)
        graph = _capture_probe(lane.stream, out)
        # measured (H200): the mask is taken at capture
        assert _replay(graph, torch.cuda.Stream(), out) == [lane.expected_sms]
        assert _replay(graph, pset.stream("prefill"), out) == [lane.expected_sms]


def test_graph_captured_unmasked_ignores_a_masked_replay_stream(backend, sm_count):
    plain = torch.cuda.Stream()
    out = _probe_out(sm_count)
    graph = _capture_probe(plain, out)
    with backend.open(SMSplit(decode=16)) as pset:
        # measured on the H100 (November): the replay stream's mask does not reach the graph
        assert _replay(graph, pset.stream("decode"), out) == [frozenset(range(sm_count))]


def test_one_graph_places_kernels_on_two_lanes(backend, sm_count):
    with backend.open(SMSplit(prefill=96, decode=36)) as pset:
        p, d = pset.lane("prefill"), pset.lane("decode")
        outs = [_probe_out(sm_count) for _ in range(3)]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=p.stream):
            d.stream.wait_stream(p.stream)  # fork: the decode lane joins the capture
            probe.launch_probe(p.stream, outs[0])
            probe.launch_probe(d.stream, outs[1])
            p.stream.wait_stream(d.stream)  # join back before the capture ends
            probe.launch_probe(p.stream, outs[2])
        seen = _replay(graph, torch.cuda.Stream(), *outs)
        assert seen == [p.expected_sms, d.expected_sms, p.expected_sms]


def test_masked_stream_rewrites_and_restores_its_record(backend, sm_count):
    lib, tmap = native.load(), backend.tpc_map()
    small = tmap.mask_for(range(0, 8))
    ms = backend.new_stream()
    try:
        ms.set(small)
        assert lib.read_record(ms.handle, ms.offset) == [1, *small.disabled_words()]
        assert probe.observed_sms(ms.stream, sm_count) == tmap.sms(small) and len(tmap.sms(small)) == 16
        ms.set(tmap.live)  # a later write passes the compare-and-write against our last write
        assert probe.observed_sms(ms.stream, sm_count) == frozenset(range(sm_count))
    finally:
        ms.close()  # restores the empty record, then destroys the stream
    assert ms.handle is None


def test_no_launch_hook_is_installed_by_record_lanes(backend):
    with backend.open(SMSplit(decode=16)):
        pass
    assert native.load().hook_stats()["installed"] == 0 and not hook_state.hook_installed()


def test_gemm_throughput_rises_with_tpc_lane_size(backend, sm_count):
    from test_partition_gpu import gemm_tflops

    rates = []
    for sms in (16, 64, sm_count):
        with backend.open(SMSplit(decode=sms)) as pset:
            rates.append(gemm_tflops(pset.stream("decode")))
    # 4x more SMs should give far more than 2x; a lane that did not hold would be flat.
    assert rates[0] * 2 < rates[1] < rates[2] * 1.05, rates


# ---- checks that need a fresh process ------------------------------------------------------------


def _run_fresh(path: Path, **env: str) -> None:
    """Run a checks file with pytest in a new Python process; fail with its output if it fails,
    skip (with its summary) if it only skipped."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, cwd=TESTS.parent, timeout=900)
    report = done.stdout[-8000:] + done.stderr[-4000:]
    assert done.returncode == 0, report
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if not re.search(r"\d+ passed", summary):
        pytest.skip(f"{path.name}: {summary}")


def test_hook_mechanism_in_a_fresh_process(tmp_path):
    why = available_backends(describe_state()[0])["tpc"]
    if why:
        pytest.skip(f"tpc backend unavailable: {why}")
    _run_fresh(TESTS / "fresh_process" / "hook_mechanism_checks.py",
               BULLET_TPC_MECHANISM="hook", BULLET_CACHE_DIR=str(tmp_path))


def test_green_then_tpc_then_green_in_one_process(backend, tmp_path):
    _run_fresh(TESTS / "fresh_process" / "green_and_tpc_checks.py", BULLET_CACHE_DIR=str(tmp_path))
