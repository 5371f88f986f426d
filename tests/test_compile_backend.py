"""torch.compile(backend="bullet"): found by name, equals eager, honest fallbacks, graphs per split."""

import subprocess
import sys
import warnings

import pytest
import torch

import bullet_kernels
from bullet_kernels.compile import backend as compile_backend
from bullet_kernels.compile.backend import why_not_capturable
from bullet_kernels.engine import forget_warnings


class TinyMLP(torch.nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.up = torch.nn.Linear(dim, 4 * dim)
        self.down = torch.nn.Linear(4 * dim, dim)
        self.register_buffer("scale", torch.full((dim,), 0.5))

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x))) * self.scale + x


def test_backend_is_found_by_name_in_a_fresh_interpreter_without_importing_us():
    code = (
        "import sys, torch, torch._dynamo\n"
        "fn = torch._dynamo.lookup_backend('bullet')\n"
        "assert 'bullet_kernels' in fn.__module__, fn\n"
        "print('found', fn.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "found bullet_backend" in out.stdout


def test_registered_on_import():
    assert "bullet" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("bullet") is compile_backend.bullet_backend


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cpu_compile_equals_eager_and_warns_once_why_there_are_no_graphs():
    torch._dynamo.reset()
    forget_warnings()
    model = TinyMLP().eval()
    x = torch.randn(4, 32)
    compiled = torch.compile(model, backend="bullet", dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = compiled(x)
        y2 = compiled(x)
    torch.testing.assert_close(y1, model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, y1)
    reasons = [str(w.message) for w in caught if "bullet backend" in str(w.message)]
    assert reasons == ["bullet backend: no GPU: running the Inductor-compiled code without CUDA graphs"]


def _gm(fn, *inputs):
    return torch.fx.symbolic_trace(fn), list(inputs)


@pytest.mark.gpu
def test_capturability_checks_name_the_reason_gpu():
    cuda_x = torch.randn(4, device="cuda")
    assert why_not_capturable(*_gm(lambda x: x * 2, cuda_x)) == ""
    assert "is on cpu" in why_not_capturable(*_gm(lambda x: x * 2, torch.randn(4)))
    assert "mutates input" in why_not_capturable(*_gm(lambda x: x.add_(1), cuda_x))
    assert "CPU tensor" in why_not_capturable(*_gm(lambda x: x + torch.ones(4, device="cpu"), cuda_x))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU reason")
def test_capturability_says_no_gpu_first():
    assert why_not_capturable(*_gm(lambda x: x * 2, torch.randn(4))).startswith("no GPU")


@pytest.mark.gpu
def test_gpu_graphs_per_split_equal_eager_and_keep_their_sms():
    from bullet_kernels.partition import SMSplit

    torch._dynamo.reset()
    import gc

    gc.collect()  # drop callables of earlier compiles from the registry
    model = TinyMLP(256).cuda().eval()
    x = torch.randn(64, 256, device="cuda")
    expected = model(x)
    compiled = torch.compile(model, backend="bullet", dynamic=False)
    with torch.no_grad():
        whole = compiled(x).clone()
        split = SMSplit(prefill=96, decode=36)
        outs = {}
        for lane in ("prefill", "decode"):
            with bullet_kernels.on_lane(lane, split):
                outs[lane] = compiled(x).clone()
    for y in (whole, *outs.values()):
        torch.testing.assert_close(y, expected, rtol=2e-3, atol=2e-3)
    # one graph per (shapes, split, lane) plus the whole-GPU one
    graphs = [bc for bc in compile_backend.BulletCompiled.instances if bc.graphs]
    assert len(graphs) == 1 and len(graphs[0].graphs) == 3


def _smid_op():
    """A custom op that runs the %smid probe on the current stream: opaque to Inductor, captured
    into the graph like any kernel, so its output says where the graph's kernels ran."""
    from bullet_kernels.partition import probe

    @torch.library.custom_op("bullet_test::smid", mutates_args=())
    def smid(x: torch.Tensor, blocks: int) -> torch.Tensor:
        out = torch.full((blocks,), -1, dtype=torch.int32, device=x.device)
        probe.launch_probe(torch.cuda.current_stream(), out, spin_us=5)
        return out

    @smid.register_fake
    def _(x, blocks):
        return x.new_empty((blocks,), dtype=torch.int32)

    return smid


@pytest.mark.gpu
def test_gpu_compiled_graph_for_a_split_runs_only_on_its_sms():
    from bullet_kernels.partition import SMSplit

    torch._dynamo.reset()
    smid = _smid_op()
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    model = TinyMLP(256).cuda().eval()

    def fn(x):
        return model(x), smid(x, 4 * sm_count)

    compiled = torch.compile(fn, backend="bullet", dynamic=False)
    x = torch.randn(64, 256, device="cuda")
    split = SMSplit(prefill=96, decode=36)
    with torch.no_grad():
        for lane in ("decode", "prefill"):
            with bullet_kernels.on_lane(lane, split) as sel:
                compiled(x)  # first call captures
                _, sms = compiled(x)  # replay
                torch.cuda.synchronize()
                seen = frozenset(sms.tolist())
                expected = sel.pset.lane(lane)
                assert seen <= expected.observed_sms and len(seen) == expected.granted, (lane, sorted(seen))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-partition fallback")
def test_on_lane_without_a_partition_backend_warns_and_runs_on_the_whole_device():
    from bullet_kernels.compile import lanes
    from bullet_kernels.errors import UnsupportedError

    forget_warnings()
    with pytest.warns(RuntimeWarning, match="green.*unavailable.*running lane 'decode' on the whole device"):
        with bullet_kernels.on_lane("decode", "prefill=96,decode=36") as sel:
            assert sel is None and lanes.current() is None
    with pytest.raises(UnsupportedError, match="partition backend 'green' is unavailable"):
        with bullet_kernels.on_lane("decode", "prefill=96,decode=36", strict=True):
            pass
