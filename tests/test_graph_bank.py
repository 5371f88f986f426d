"""Graph bank: bucket choice (CPU) and capture/replay per SM split (GPU)."""

import pytest
import torch

from bullet_kernels.errors import CaptureError, NoBucketError
from bullet_kernels.engine.graph_bank import GraphBank, GraphKey, default_buckets, pick_bucket
from bullet_kernels.partition import Partitioner, SMSplit, probe


def test_pick_bucket_takes_the_smallest_that_fits_and_names_the_captured_ones():
    assert pick_bucket([8, 1, 4, 2], 3, "batch") == 4
    assert pick_bucket([8, 1, 4, 2], 8, "batch") == 8
    with pytest.raises(NoBucketError, match=r"batch 9 is larger than every captured bucket \(largest 8\)"):
        pick_bucket([1, 2, 4, 8], 9, "batch")
    with pytest.raises(NoBucketError, match="no tokens buckets"):
        pick_bucket([], 1, "tokens")
    with pytest.raises(ValueError, match="positive"):
        pick_bucket([1], 0, "batch")


def test_default_buckets_are_dense_where_decode_lives():
    b = default_buckets(256)
    assert b[:5] == [1, 2, 4, 8, 16] and b[-1] == 256 and b == sorted(set(b))
    assert default_buckets(100)[-1] == 100


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_graph_bank_without_gpu_says_so():
    with pytest.raises(CaptureError, match="need a GPU"):
        GraphBank()


@pytest.mark.gpu
def test_replay_under_every_split_matches_eager_and_keeps_its_sms():
    torch.manual_seed(0)
    x = torch.randn(256, 1024, device="cuda")
    w = torch.randn(1024, 1024, device="cuda")
    out = torch.empty(256, 1024, device="cuda")
    sms = torch.full((4 * 132,), -1, dtype=torch.int32, device="cuda")

    def fn():
        torch.matmul(x, w, out=out)
        torch.relu_(out)
        probe.launch_probe(torch.cuda.current_stream(), sms, spin_us=5)
        return out

    expected = torch.relu(x @ w)
    with Partitioner("green") as parts:
        bank = GraphBank(parts)
        splits = [SMSplit(prefill=96, decode=36), SMSplit(prefill=104, decode=28), None]
        for split in splits:
            for lane in (split.names if split else ["main"]):
                key = GraphKey("decode", 256, split, lane)
                bank.capture(key, fn)
        other = torch.cuda.Stream()
        for key in bank.keys():
            out.zero_()
            sms.fill_(-1)
            bank.replay(key, stream=other)
            other.synchronize()
            # cuBLAS may pick another algorithm on a partition: fp32 sums in another order.
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3)
            if key.split is not None:
                assert len(probe.sms_written(sms)) == parts.get(key.split).lane(key.lane).granted
        with pytest.raises(KeyError, match="no graph captured"):
            bank.get(GraphKey("decode", 512, None, "main"))
        bank.close()
