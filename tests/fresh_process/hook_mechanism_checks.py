"""The tpc backend's launch-hook mechanism on a real GPU. Installs the hook, after which the
driver refuses green contexts in the process, so tests/test_tpc_gpu.py runs this file in a
fresh process with ``BULLET_TPC_MECHANISM=hook``; not collected by a plain ``pytest`` run.

Asserts *measured* behaviour (docs/tpc-masks.md, H100, driver 580): hook masks follow the
launching thread, descriptor bits are physical TPC ids, and a graph keeps the mask in force
when its executable was uploaded.
"""

from __future__ import annotations

import pytest
import torch

from bullet_kernels.device import check, driver_module
from bullet_kernels.errors import UnsupportedError
from bullet_kernels.partition import SMSplit, get_backend, hook_state, probe
from bullet_kernels.partition.tpc import diagnostics
from bullet_kernels.partition.tpc.masks import TpcMap

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def backend():
    b = get_backend("tpc")
    assert b.mechanism == "hook", "run with BULLET_TPC_MECHANISM=hook"
    return b


@pytest.fixture(scope="module")
def sm_count(backend) -> int:
    return backend.device.sm_count


def _probe_out(sm_count: int) -> torch.Tensor:
    out = torch.full((4 * sm_count,), -1, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    return out


def _replay(graph, stream, out) -> frozenset[int]:
    out.fill_(-1)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.replay()
    stream.synchronize()
    return probe.sms_written(out)


def _capture_and_upload(stream, out) -> torch.cuda.CUDAGraph:
    """Capture a probe on ``stream`` and upload the executable there, in the caller's scope
    (the hook writes each descriptor's mask at upload)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        probe.launch_probe(stream, out)
    drv = driver_module()
    check(drv.cuGraphUpload(drv.CUgraphExec(int(graph.raw_cuda_graph_exec())), drv.CUstream(stream.cuda_stream)),
          "cuGraphUpload")
    stream.synchronize()
    return graph


def test_descriptor_map_is_consistent(backend):
    tmap = backend.tpc_map()
    assert tmap.problems() == [] and tmap.tpc_count == backend.device.tpc_count
    assert {len(sms) for sms in tmap.bits if sms} == {2}


def test_hopper_descriptor_bits_are_physical_tpcs(backend, sm_count):
    d = backend.device
    if d.compute_capability != (9, 0) or d.driver_api_version != 13000:
        pytest.skip("measured on Hopper with driver API 13000")
    # measured on the H100: bit 1 -> SMs 16, 17, with dead bits between GPCs
    assert backend.tpc_map().bits != TpcMap.linear(sm_count).bits
    assert max(backend.tpc_map().live_bits) > sm_count // 2


@pytest.mark.parametrize("text", ["prefill=96,decode=36", "decode=2", "decode=34", "decode=132"])
def test_each_lane_runs_on_exactly_its_sms_inside_its_scope(backend, sm_count, text):
    with backend.open(SMSplit.parse(text)) as pset:
        assert pset.needs_scope
        for name, lane in pset.lanes.items():
            with pset.lane_scope(name):
                observed = probe.observed_sms(lane.stream, sm_count)
            assert observed == lane.expected_sms and len(observed) == lane.granted, (name, sorted(observed))


def test_overlapping_lanes_share_exactly_the_expected_sms(backend, sm_count):
    with backend.open(SMSplit(prefill=100, decode=64, overlap=True)) as pset:
        p, d = pset.lane("prefill"), pset.lane("decode")
        with pset.lane_scope("prefill"):
            seen_p = probe.observed_sms(p.stream, sm_count)
        with pset.lane_scope("decode"):
            seen_d = probe.observed_sms(d.stream, sm_count)
        assert (seen_p, seen_d) == (p.expected_sms, d.expected_sms)
        assert len(seen_p & seen_d) == 100 + 64 - sm_count


def test_hook_lanes_mask_the_launching_thread_not_the_stream(backend, sm_count):
    with backend.open(SMSplit(prefill=96, decode=36)) as pset:
        lane = pset.lane("decode")
        # measured: the callback's params do not name the stream
        assert probe.observed_sms(lane.stream, sm_count) == frozenset(range(sm_count))
        with pset.use("decode"):
            assert probe.observed_sms(torch.cuda.Stream(), sm_count) == lane.expected_sms


def test_graph_uploaded_in_a_lane_scope_keeps_the_lane(backend, sm_count):
    with backend.open(SMSplit(prefill=96, decode=36)) as pset:
        lane, out = pset.lane("decode"), _probe_out(sm_count)
        with pset.lane_scope("decode"):
            graph = _capture_and_upload(lane.stream, out)
        assert _replay(graph, torch.cuda.Stream(), out) == lane.expected_sms
        with pset.lane_scope("prefill"):  # measured: the mask written at upload sticks
            assert _replay(graph, pset.stream("prefill"), out) == lane.expected_sms


def test_graph_uploaded_unmasked_ignores_the_lane_it_is_replayed_in(backend, sm_count):
    plain, out = torch.cuda.Stream(), _probe_out(sm_count)
    graph = _capture_and_upload(plain, out)
    with backend.open(SMSplit(decode=16)) as pset, pset.use("decode"):
        assert _replay(graph, pset.stream("decode"), out) == frozenset(range(sm_count))


def test_next_launch_mask_restricts_one_launch_and_counts_a_write(backend, sm_count):
    tmap = diagnostics.descriptor_map(backend)
    mask = tmap.mask_for(range(0, 4))
    stream = torch.cuda.Stream()
    first, second = _probe_out(sm_count), _probe_out(sm_count)
    stats0 = diagnostics.hook_stats()
    with diagnostics.next_launch_mask(backend, mask):
        probe.launch_probe(stream, first)  # nothing else may launch in between
        probe.launch_probe(stream, second)  # the mask was consumed by the first launch
    stream.synchronize()
    stats = diagnostics.hook_stats()
    info = f"hook stats before {stats0}, after {stats}"
    assert stats["installed"] == 1 and stats["writes"] > stats0["writes"], info
    assert stats["last_params_size"] >= 40, info
    assert probe.sms_written(first) == tmap.sms(mask), info
    assert probe.sms_written(second) == frozenset(range(sm_count)), info


def test_green_contexts_are_refused_once_the_hook_is_installed(backend):
    assert hook_state.hook_installed()
    with pytest.raises(UnsupportedError, match="launch hook is installed"):
        get_backend("green").open(SMSplit(decode=32))
    # the fact behind that guard, asked of the driver itself (measured on the H100, driver 580)
    drv = driver_module()
    dev = check(drv.cuDeviceGet(backend.device.index), "cuDeviceGet")
    sms = check(drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource")
    groups, _, _ = check(drv.cuDevSmResourceSplitByCount(1, sms, 0, 32), "cuDevSmResourceSplitByCount")
    desc = check(drv.cuDevResourceGenerateDesc([groups[0]], 1), "cuDevResourceGenerateDesc")
    err, *_ = drv.cuGreenCtxCreate(desc, dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM)
    assert err == drv.CUresult.CUDA_ERROR_NOT_SUPPORTED, err
