"""Green and none backends on a real GPU: kernels stay on their SMs, graphs keep their split."""

import pytest
import torch

from bullet_kernels.errors import ClosedError, InvalidSplitError
from bullet_kernels.partition import Partitioner, SMSplit, probe

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def green():
    with Partitioner("green") as parts:
        yield parts


@pytest.mark.parametrize("text", ["prefill=96,decode=36", "prefill=104,decode=28", "decode=16", "decode=132"])
def test_green_lanes_run_on_exactly_their_granted_sms(green, text):
    pset = green.get(SMSplit.parse(text))
    seen = []
    for lane in pset.lanes.values():
        observed = probe.observed_sms(lane.stream, pset.device.sm_count)  # fresh probe, not the cached one
        assert len(observed) == lane.granted, (lane.name, sorted(observed))
        seen.append(observed)
    if len(seen) == 2:
        assert not (seen[0] & seen[1])


def test_graph_captured_on_a_green_lane_keeps_its_sms_on_a_full_gpu_stream(green):
    pset = green.get(SMSplit(prefill=96, decode=36))
    lane = pset.lane("decode")
    sm_count = pset.device.sm_count
    out = torch.full((4 * sm_count,), -1, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=lane.stream):
        probe.launch_probe(lane.stream, out)
    out.fill_(-1)
    full = torch.cuda.Stream()
    full.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(full):
        graph.replay()
    full.synchronize()
    replayed = probe.sms_written(out)
    assert replayed <= lane.observed_sms and len(replayed) == lane.granted == 36


def gemm_tflops(stream, n=8192, reps=10):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
    end.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) * 1e-3) / 1e12


def test_gemm_throughput_rises_with_partition_size(green):
    rates = [gemm_tflops(green.get(SMSplit(decode=sms)).stream("decode")) for sms in (16, 64, 132)]
    # 8x more SMs should give far more than 2x; a partition that did not hold would be flat.
    assert rates[0] * 2 < rates[1] < rates[2] * 1.05, rates


def test_green_refuses_bad_splits_and_reuse_after_close():
    with Partitioner("green") as parts:
        with pytest.raises(InvalidSplitError, match="does not fit"):
            parts.get(SMSplit(prefill=100, decode=36))
        pset = parts.get(SMSplit(decode=16))
    with pytest.raises(ClosedError):
        pset.stream("decode")


def test_none_backend_lanes_see_the_whole_gpu():
    with Partitioner("none") as parts:
        pset = parts.get(SMSplit(prefill=96, decode=36))
        for lane in pset.lanes.values():
            assert lane.whole_gpu and len(lane.observed_sms) == pset.device.sm_count
