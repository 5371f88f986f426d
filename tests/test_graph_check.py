"""Per-graph verification: the decision on simulated probe results (CPU), the driver path (GPU)."""

import pytest
import torch

from bullet_kernels.engine.graph_check import GraphVerificationError, LaneExpectation, check_graph_lanes, check_graph_sms

LANE = LaneExpectation("prefill96-decode36:decode", 36, frozenset(range(96, 132)), 132)


def test_a_graph_on_exactly_its_lane_passes():
    check_graph_sms("decode[32]", frozenset(range(96, 132)), LANE)


def test_a_graph_on_another_lanes_sms_is_refused_naming_lane_asked_and_seen():
    with pytest.raises(GraphVerificationError) as err:
        check_graph_sms("decode[32]", frozenset(range(0, 36)), LANE)
    text = str(err.value)
    assert "prefill96-decode36:decode" in text and "outside the lane's 36" in text and "0-35" in text


def test_a_graph_on_too_few_sms_is_refused():
    with pytest.raises(GraphVerificationError, match="ran on 28 SMs, not the 36 granted"):
        check_graph_sms("decode[32]", frozenset(range(96, 124)), LANE)


def test_an_unprobed_lane_is_checked_by_count_alone():
    lane = LaneExpectation("x:decode", 36, None, 132)
    check_graph_sms("g", frozenset(range(0, 36)), lane)
    with pytest.raises(GraphVerificationError, match="ran on 132 SMs"):
        check_graph_sms("g", frozenset(range(132)), lane)


def test_ids_outside_the_device_are_refused():
    with pytest.raises(GraphVerificationError, match="outside 0..131"):
        check_graph_sms("g", frozenset([*range(97, 132), 140]), LANE)


@pytest.mark.gpu
def test_a_graph_that_escapes_its_expectation_is_refused_on_the_gpu():
    from bullet_kernels.engine.graph_bank import capture_on_stream, whole_gpu_stream

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.randn(1024, 1024, device="cuda")
    stream = whole_gpu_stream(0)
    pool = torch.cuda.graph_pool_handle()
    # A whole-GPU capture checked against a 16-SM lane must be refused: it runs on every SM.
    lie = LaneExpectation("fake:decode", 16, frozenset(range(16)), sms)
    with pytest.raises(GraphVerificationError, match="fake:decode"):
        capture_on_stream(lambda: x @ x, stream, sms, pool, check_lane=lie, name="escape")
    # The truth passes, and the probe node costs nothing afterwards: replays still compute.
    truth = LaneExpectation("whole-gpu", sms, frozenset(range(sms)), sms)
    graph, out = capture_on_stream(lambda: x @ x, stream, sms, pool, check_lane=truth, name="ok")
    x.mul_(2)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, x @ x)


# -- kernel-level placement: one probe per lane, each checked against its own lane ---------------

GEMM_LANE = LaneExpectation("prefill68-decode64:decode (GEMM lane)", 64, frozenset(range(68, 132)), 132)


def test_every_lane_of_a_placed_graph_passes_on_its_own_sms():
    check_graph_lanes("decode[128]+gemm", [(frozenset(range(96, 132)), LANE), (frozenset(range(68, 132)), GEMM_LANE)])


def test_a_gemm_lane_that_escapes_is_refused_naming_that_lane():
    # The home probe is fine; the GEMM lane's probe ran on the home lane's 36 SMs only.
    with pytest.raises(GraphVerificationError) as err:
        check_graph_lanes("decode[128]+gemm", [(frozenset(range(96, 132)), LANE), (frozenset(range(96, 132)), GEMM_LANE)])
    text = str(err.value)
    assert "GEMM lane" in text and "ran on 36 SMs, not the 64 granted" in text


def test_the_home_lane_is_checked_first_and_no_probes_is_an_error():
    with pytest.raises(GraphVerificationError, match="prefill96-decode36:decode"):
        check_graph_lanes("g", [(frozenset(range(0, 36)), LANE), (frozenset(range(68, 132)), GEMM_LANE)])
    with pytest.raises(ValueError, match="no probe results"):
        check_graph_lanes("g", [])
