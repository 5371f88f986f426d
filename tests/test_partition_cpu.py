"""Partition objects, verification and `bullet info` without a GPU (CPU)."""

import subprocess
import sys

import pytest

from bullet_kernels.errors import ClosedError, InvalidSplitError, PartitionVerificationError, UnsupportedError
from bullet_kernels.partition import Partitioner, SMSplit, available_backends, backend_class, get_backend
from bullet_kernels.partition.base import Backend, Lane, format_ranges
from bullet_kernels.partition.verification import check_lanes

requires_no_gpu = pytest.mark.skipif(
    __import__("bullet_kernels.device", fromlist=["x"]).describe_state()[0] is not None,
    reason="checks the no-GPU behaviour",
)


def _lane(name, granted, observed, expected=None, whole=False):
    return Lane(name, granted, granted, None, frozenset(expected) if expected else None, frozenset(observed), whole)


def test_format_ranges_writes_inclusive_runs():
    assert format_ranges([0, 1, 2, 5, 6, 9]) == "0-2,5-6,9"
    assert format_ranges([]) == ""


def test_backends_describe_themselves_and_the_default_is_empty():
    class Minimal(Backend):
        name = "minimal"

        @classmethod
        def unavailable_reason(cls, device):
            return ""

        def grant(self, split):
            return {}

        def open(self, split, verify=True):
            raise NotImplementedError

    assert Minimal(None).describe() == ""
    assert backend_class("green")(None).describe().startswith("green contexts")


def test_verification_accepts_exact_disjoint_lanes():
    lanes = {"prefill": _lane("prefill", 4, range(4), range(4)), "decode": _lane("decode", 2, {4, 5})}
    check_lanes(lanes, 8, disjoint=True, backend="tpc", driver="13.0")


@pytest.mark.parametrize("lanes, msg", [
    ({"d": _lane("d", 2, {0, 1, 2}, {0, 1})}, "escaped its mask"),
    ({"d": _lane("d", 4, {0, 1})}, "granted 4 SMs but the probe ran on 2"),
    ({"a": _lane("a", 2, {0, 1}), "b": _lane("b", 2, {1, 2})}, "promised disjoint but share SMs 1"),
    ({"d": _lane("d", 1, {99})}, "outside 0..7"),
])
def test_verification_refuses_and_names_the_driver(lanes, msg):
    with pytest.raises(PartitionVerificationError, match=msg) as err:
        check_lanes(lanes, 8, disjoint=True, backend="green", driver="13.0")
    assert "driver 13.0" in str(err.value) and "Refusing to run unpartitioned" in str(err.value)
    # only a green lane on fewer SMs gets the advice for the shared-SM effect of open sets
    assert ("Partitioner.release" in str(err.value)) == (msg == "granted 4 SMs but the probe ran on 2")


@requires_no_gpu
def test_without_gpu_only_none_is_available_and_green_explains():
    reasons = available_backends(None)
    assert reasons["none"] == "" and "no GPU" in reasons["green"]
    with pytest.raises(UnsupportedError, match="usable here: none"):
        get_backend("green")
    with pytest.raises(UnsupportedError, match="choose one of green, tpc, none"):
        get_backend("mps")


@requires_no_gpu
def test_none_backend_runs_on_cpu_and_refuses_use_after_close():
    parts = Partitioner("none")
    pset = parts.get(SMSplit(prefill=96, decode=36))
    assert parts.get(SMSplit(prefill=96, decode=36)) is pset  # cached per configuration
    with pset.use("decode") as stream:
        assert stream is None
    parts.close()
    with pytest.raises(ClosedError, match="closed"):
        pset.stream("decode")
    with pytest.raises(ClosedError, match="already closed"):
        pset.close()
    with pytest.raises(ClosedError, match="already closed"):
        parts.close()
    with pytest.raises(ClosedError):
        parts.get(SMSplit(decode=8))


def test_release_closes_one_split_and_a_later_get_opens_a_fresh_set():
    parts = Partitioner("none")
    old, other = parts.get(SMSplit(prefill=96, decode=36)), parts.get(SMSplit(prefill=104, decode=28))
    parts.release(SMSplit(prefill=96, decode=36))
    assert old.closed and not other.closed and parts.open_sets() == [other]
    fresh = parts.get(SMSplit(prefill=96, decode=36))
    assert fresh is not old and not fresh.closed
    with pytest.raises(KeyError, match="split prefill64-decode68 is not open in this Partitioner; open: "
                                       "prefill104-decode28, prefill96-decode36"):
        parts.release(SMSplit(prefill=64, decode=68))
    parts.close()
    with pytest.raises(ClosedError, match="closed"):
        parts.release(SMSplit(prefill=96, decode=36))


def test_package_imports_without_native_library_or_gpu():
    code = "import bullet_kernels, bullet_kernels.partition, bullet_kernels.device; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"BULLET_TPC_LIB": "/nonexistent/libbullet_tpc.so", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@requires_no_gpu
def test_bullet_info_without_gpu_exits_zero_and_says_why():
    out = subprocess.run([sys.executable, "-m", "bullet_kernels.cli", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "GPU: none" in out.stdout and "none   available" in out.stdout


def _fake_device(**overrides):
    from bullet_kernels.device import DeviceInfo

    facts = dict(index=0, name="Old GPU", uuid="GPU-0", sm_count=80, tpc_count=40, compute_capability=(7, 0),
                 driver_api_version=12020, kernel_driver="", total_memory_bytes=0, l2_bytes=0,
                 green_contexts=False, green_unavailable_reason="CUDA_ERROR_NOT_SUPPORTED",
                 min_partition_sms=0, partition_alignment_sms=0)
    return DeviceInfo(**{**facts, **overrides})


def test_green_on_an_unsupported_gpu_names_the_reason_and_the_fallback():
    from bullet_kernels.partition.green import GreenBackend

    backend = GreenBackend(_fake_device())
    assert "CUDA_ERROR_NOT_SUPPORTED" in GreenBackend.unavailable_reason(backend.device)
    with pytest.raises(UnsupportedError, match="green backend unavailable: green contexts unsupported.*backend='none'"):
        backend.grant(SMSplit(decode=8))
    with pytest.raises(UnsupportedError):
        backend.open(SMSplit(decode=8))


def test_green_grants_follow_the_device_granularity():
    from bullet_kernels.partition.green import GreenBackend

    backend = GreenBackend(_fake_device(green_contexts=True, min_partition_sms=4, partition_alignment_sms=2))
    assert backend.grant(SMSplit(prefill=61, decode=17)) == {"prefill": 62, "decode": 18}
    with pytest.raises(InvalidSplitError, match="multiples of 2 SMs \\(at least 4\\)"):
        backend.grant(SMSplit(prefill=61, decode=19))  # 62 + 20 > 80, and no remainder fits


def test_a_refused_set_is_set_aside_and_made_again():
    """open_verified_retrying: a set failing verification keeps its resources aside (not
    released, so a rebuild cannot get them back) and a fresh one is built and checked."""
    from bullet_kernels.errors import PartitionVerificationError
    from bullet_kernels.partition.base import PartitionSet
    from bullet_kernels.partition.config import SMSplit
    from bullet_kernels.partition.verification import open_verified_retrying

    events = []
    verdicts = iter([False, False, True])

    def build():
        events.append("build")
        return PartitionSet("green", SMSplit(prefill=100, decode=32), None, {})

    def check(pset):
        if not next(verdicts):
            raise PartitionVerificationError("lane 'prefill' was granted 104 SMs but the probe ran on 96")

    pset, failures = open_verified_retrying(build, lambda: events.append("release"),
                                            lambda: events.append("aside"), 3, check=check)
    assert events == ["build", "aside", "build", "aside", "build"] and len(failures) == 2
    assert isinstance(pset, PartitionSet)

    verdicts = iter([False, False])
    events.clear()
    with pytest.raises(PartitionVerificationError, match="refused 2 times") as err:
        open_verified_retrying(build, lambda: events.append("release"), lambda: events.append("aside"), 2, check=check)
    assert "earlier: " in str(err.value) and events == ["build", "aside", "build", "aside"]

    def broken(pset):
        raise RuntimeError("driver error")

    events.clear()
    with pytest.raises(RuntimeError, match="driver error"):
        open_verified_retrying(build, lambda: events.append("release"), lambda: events.append("aside"), 3, check=broken)
    assert events == ["build", "release"]  # not a verification failure: released, not retried
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        open_verified_retrying(build, lambda: None, lambda: None, 0)


def test_a_set_that_only_undercounts_may_be_probed_again_before_fresh_contexts(monkeypatch):
    """settle: the same set is probed again while its only problem is lanes on fewer SMs than
    granted; an escape or an overlap is never probed again (docs/green-contexts.md)."""
    from bullet_kernels.errors import PartitionVerificationError
    from bullet_kernels.partition import green
    from bullet_kernels.partition.base import Lane, PartitionSet
    from bullet_kernels.partition.config import SMSplit
    from bullet_kernels.partition.verification import check_lanes, open_verified_retrying

    def lanes(prefill_seen, decode_seen):
        out = {"prefill": Lane("prefill", 4, 4, None), "decode": Lane("decode", 2, 2, None)}
        out["prefill"].observed_sms, out["decode"].observed_sms = frozenset(prefill_seen), frozenset(decode_seen)
        return out

    with pytest.raises(PartitionVerificationError) as under:
        check_lanes(lanes({0, 1}, {4, 5}), 8, True, "green", "13.0")  # prefill on 2 of its 4
    with pytest.raises(PartitionVerificationError) as shared:
        check_lanes(lanes({0, 1, 2, 4}, {4, 5}), 8, True, "green", "13.0")  # SM 4 in both lanes
    assert under.value.undercount_only and not shared.value.undercount_only

    events, verdicts = [], iter([under.value, under.value, None])

    def build():
        events.append("build")
        return PartitionSet("green", SMSplit(prefill=4, decode=2), None, {})

    def check(pset):
        exc = next(verdicts)
        if exc is not None:
            raise exc

    pset, failures = open_verified_retrying(build, lambda: events.append("release"), lambda: events.append("aside"),
                                            3, check=check, settle=2)
    assert events == ["build"] and len(failures) == 2 and all(f.startswith("(probed again)") for f in failures)
    events.clear()
    verdicts = iter([shared.value, None])
    pset, failures = open_verified_retrying(build, lambda: events.append("release"), lambda: events.append("aside"),
                                            3, check=check, settle=2)
    assert events == ["build", "aside", "build"] and len(failures) == 1  # an overlap: fresh contexts at once
    events.clear()
    verdicts = iter([under.value] * 3 + [None])
    open_verified_retrying(build, lambda: None, lambda: events.append("aside"), 3, check=check, settle=1)
    # one re-probe, still short: the set goes aside; the fresh one verifies on its re-probe
    assert events == ["build", "aside", "build"]

    assert green.settle_probes() == 0  # off until the fade experiment says it helps
    monkeypatch.setenv(green.SETTLE_ENV, "3")
    assert green.settle_probes() == 3
    monkeypatch.setenv(green.SETTLE_ENV, "some")
    with pytest.raises(ValueError, match="whole number of re-probes"):
        green.settle_probes()


class _FakeGreenDriver:
    """Enough of cuda.bindings.driver for GreenBackend._carve: SM resources are counted, each
    descriptor remembers the resources it was made of."""

    def __init__(self, sm_count):
        from types import SimpleNamespace

        from cuda.bindings import driver

        self.ok, self.ns = driver.CUresult.CUDA_SUCCESS, SimpleNamespace
        self.CUdevResourceType, self.CUgreenCtxCreate_flags, self.CUstream_flags = (
            driver.CUdevResourceType, driver.CUgreenCtxCreate_flags, driver.CUstream_flags)
        self.sm_count, self.split_calls, self.descs = sm_count, [], []

    def res(self, n, tag):
        return self.ns(sm=self.ns(smCount=n), tag=tag)

    def cuDeviceGetDevResource(self, dev, kind):
        return self.ok, self.res(self.sm_count, "device")

    def cuDevSmResourceSplitByCount(self, groups, whole, flags, size):
        self.split_calls.append((groups, whole.sm.smCount, size))
        made = [self.res(size, f"{whole.tag}/{i}") for i in range(groups)]
        return self.ok, made, groups, self.res(whole.sm.smCount - groups * size, f"{whole.tag}/rest")

    def cuDevResourceGenerateDesc(self, resources, n):
        self.descs.append([r.tag for r in resources][:n])
        return self.ok, len(self.descs)

    def cuGreenCtxCreate(self, desc, dev, flags):
        return self.ok, desc

    def cuGreenCtxStreamCreate(self, ctx, flags, priority):
        return self.ok, 1000 + ctx


@pytest.mark.parametrize("carve", ["split", "atoms"])
def test_green_lanes_are_carved_per_set_or_from_one_split_into_atoms(monkeypatch, carve):
    import torch

    from bullet_kernels.partition import green

    pytest.importorskip("cuda.bindings")
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda handle, device=None: handle)
    monkeypatch.setattr(green, "_atoms_by_device", {})
    monkeypatch.setenv(green.CARVE_ENV, carve)
    backend = green.GreenBackend(_fake_device(sm_count=132, green_contexts=True, min_partition_sms=8,
                                              partition_alignment_sms=8))
    drv = _FakeGreenDriver(132)
    for split in (SMSplit(prefill=96, decode=36), SMSplit(prefill=104, decode=28)):
        lanes = backend._carve(drv, 0, split, backend.grant(split), created=[])
        assert [(n, lane.granted) for n, lane in lanes.items()] == [(n, split[n]) for n in split.names]
    if carve == "split":  # one split call per aligned lane, off the remainder; the last lane takes it
        assert drv.split_calls == [(1, 132, 96), (1, 132, 104)]
        assert drv.descs == [["device/0"], ["device/rest"], ["device/0"], ["device/rest"]]
    else:  # one split of the device into 16 atoms of 8 (4 SMs left over), shared by both sets
        assert drv.split_calls == [(16, 132, 8)]
        atoms = [f"device/{i}" for i in range(16)]
        assert drv.descs == [atoms[:12], atoms[12:] + ["device/rest"], atoms[:13], atoms[13:] + ["device/rest"]]
        lanes = backend._carve(drv, 0, SMSplit(prefill=100, decode=32), {"prefill": 100, "decode": 32}, created=[])
        assert drv.descs[-1] == atoms[4:] + ["device/rest"]  # the remainder lane last: 12 atoms + 4 SMs
        with pytest.raises(UnsupportedError, match="lane 'prefill' \\(90 SMs\\) is not a whole number of 8-SM atoms"):
            backend._carve(drv, 0, SMSplit(prefill=90, decode=42), {"prefill": 90, "decode": 42}, created=[])
    monkeypatch.setenv(green.CARVE_ENV, "tpc")
    with pytest.raises(ValueError, match="BULLET_GREEN_CARVE must be one of split, atoms, got 'tpc'"):
        green.carve_mode()
