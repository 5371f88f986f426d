"""TpcBackend without a GPU: the real C library writes records into fake driver streams (or
fake launch descriptors), and a simulated probe runs on the SMs those allow.

Covers mechanism choice (record preferred, hook as fallback, the environment overrides), the
record's read-before-write refusals, lanes, the map cache per mechanism, and the process-wide
hook state that decides whether green contexts may still be created.
"""

from __future__ import annotations

import pytest

from bullet_kernels.errors import InvalidSplitError, PartitionVerificationError, UnsupportedError
from bullet_kernels.partition import SMSplit, hook_state, probe
from bullet_kernels.partition.tpc import TpcBackend, diagnostics, mechanism, native, streams
from bullet_kernels.partition.tpc.masks import TpcMap, TpcMask
from tpc_fakes import SimulatedHookGpu, SimulatedRecordGpu, h100, native_or_skip


@pytest.fixture
def lib():
    return native_or_skip()


@pytest.fixture
def fake_hook_state(monkeypatch):
    """A private hook flag, so a simulated install does not leak into other tests."""
    state = {"installed": False}
    monkeypatch.setattr(hook_state, "hook_installed", lambda: state["installed"])
    monkeypatch.setattr(hook_state, "mark_hook_installed", lambda: state.__setitem__("installed", True))
    return state


def simulate(gpu, lib, monkeypatch, tmp_path):
    """Route the tpc backend's library, streams and probes to a simulated GPU."""
    monkeypatch.setattr(native, "find_library", lambda: (lib, ""))
    monkeypatch.setattr(streams, "create_stream", gpu.create)
    monkeypatch.setattr(streams, "destroy_stream", gpu.destroy)
    monkeypatch.setattr(probe, "observed_sms", gpu.observed_sms)
    monkeypatch.setenv("BULLET_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(mechanism.OFFSET_ENV, raising=False)
    monkeypatch.delenv(mechanism.MECHANISM_ENV, raising=False)
    return gpu


@pytest.fixture
def sim(lib, monkeypatch, tmp_path, fake_hook_state):
    return simulate(SimulatedRecordGpu(), lib, monkeypatch, tmp_path)


@pytest.fixture
def hook_sim(lib, monkeypatch, tmp_path, fake_hook_state):
    gpu = simulate(SimulatedHookGpu(lib), lib, monkeypatch, tmp_path)
    monkeypatch.setattr(probe, "observed_sms_next_launch", gpu.observed_sms_next_launch)

    def install_hook(self):  # no driver to subscribe to: only the bookkeeping of a real install
        hook_state.mark_hook_installed()
        return lib

    monkeypatch.setattr(TpcBackend, "install_hook", install_hook)
    monkeypatch.setenv(mechanism.MECHANISM_ENV, "hook")
    lib.hook_reset_stats()
    yield gpu
    lib.set_thread_mask(None)


# ---- mechanism choice ------------------------------------------------------------------------------


def test_13000_prefers_the_record_at_0x51c(lib, monkeypatch):
    monkeypatch.delenv(mechanism.OFFSET_ENV, raising=False)
    monkeypatch.delenv(mechanism.MECHANISM_ENV, raising=False)
    assert 13000 not in mechanism.REFUTED_OFFSETS
    assert mechanism.choose(lib, 13000) == mechanism.Choice("record", "auto", 0x51C)
    assert mechanism.choose(lib, 12050) == mechanism.Choice("record", "auto", 0x4EC)


def test_unknown_driver_falls_back_to_the_hook_or_is_refused_when_record_is_forced(lib, monkeypatch):
    monkeypatch.delenv(mechanism.OFFSET_ENV, raising=False)
    monkeypatch.delenv(mechanism.MECHANISM_ENV, raising=False)
    auto = mechanism.choose(lib, 13010)
    assert (auto.mechanism, auto.offset) == ("hook", None)
    assert auto.why.startswith("driver API version 13010 has no known stream-mask offset; known: 12000, 12010")
    assert "BULLET_TPC_STREAM_OFFSET" in auto.why and "still verified" in auto.why
    monkeypatch.setenv(mechanism.MECHANISM_ENV, "record")
    forced = mechanism.choose(lib, 13010)
    assert forced.mechanism is None and forced.why.startswith("BULLET_TPC_MECHANISM=record: driver API version 13010")


def test_environment_overrides(lib, monkeypatch):
    monkeypatch.setenv(mechanism.MECHANISM_ENV, "hook")
    assert mechanism.choose(lib, 13000).mechanism == "hook"  # the hook even where a record exists
    monkeypatch.setenv(mechanism.MECHANISM_ENV, "magic")
    assert mechanism.choose(lib, 13000).why == "BULLET_TPC_MECHANISM='magic' is not one of auto, record, hook"
    monkeypatch.delenv(mechanism.MECHANISM_ENV)
    monkeypatch.setenv(mechanism.OFFSET_ENV, "0x520")
    assert mechanism.choose(lib, 13010) == mechanism.Choice("record", "auto", 0x520)
    monkeypatch.setenv(mechanism.OFFSET_ENV, "0x51d")
    assert "multiple of 4" in mechanism.choose(lib, 13010).why
    monkeypatch.setenv(mechanism.OFFSET_ENV, "x51c")
    assert "write it like 0x51c" in mechanism.choose(lib, 13010).why


def test_a_refuted_offset_is_never_used_without_the_override(lib, monkeypatch):
    monkeypatch.delenv(mechanism.OFFSET_ENV, raising=False)
    monkeypatch.setattr(mechanism, "REFUTED_OFFSETS", {13000: "it restricted nothing"})
    offset, why = mechanism.stream_offset(lib, 13000)
    assert offset is None and "0x51c of driver API version 13000 is refuted: it restricted nothing" in why
    monkeypatch.setenv(mechanism.OFFSET_ENV, "0x51c")
    assert mechanism.stream_offset(lib, 13000) == (0x51C, "")


def test_unavailable_reasons(sim, monkeypatch):
    assert TpcBackend.unavailable_reason(h100()) == ""
    assert TpcBackend.unavailable_reason(h100(driver_api_version=13010)) == ""  # auto: the hook
    monkeypatch.setenv(mechanism.MECHANISM_ENV, "record")
    assert "13010 has no known stream-mask offset" in TpcBackend.unavailable_reason(h100(driver_api_version=13010))
    monkeypatch.delenv(mechanism.MECHANISM_ENV)
    assert "compute capability 6.1 < 7.0" in TpcBackend.unavailable_reason(h100(compute_capability=(6, 1)))
    monkeypatch.setattr(native, "find_library", lambda: (None, "native library not built: ..."))
    assert TpcBackend.unavailable_reason(h100()).startswith("native library not built")


# ---- the record mechanism ------------------------------------------------------------------------------


def test_record_lanes_are_masked_streams_and_close_restores_them(sim, fake_hook_state):
    backend = TpcBackend(h100())
    assert backend.mechanism == "record"
    pset = backend.open(SMSplit(prefill=96, decode=35))
    assert not pset.needs_scope  # the stream carries the mask
    prefill, decode = pset.lane("prefill"), pset.lane("decode")
    assert prefill.expected_sms == prefill.observed_sms == frozenset(range(96))
    assert decode.expected_sms == decode.observed_sms == frozenset(range(96, 132))
    assert (decode.asked, decode.granted) == (35, 36)
    assert sim.streams[int(decode.stream)].record == [1, *TpcMask.range(48, 66).disabled_words()]
    pset.close()
    assert not sim.streams and sim.records_at_destroy[-2:] == [[0] * 5] * 2  # restored, then destroyed
    assert not fake_hook_state["installed"]  # no launch callback: green contexts stay possible


@pytest.mark.parametrize("text, sms", [("decode=2", range(0, 2)), ("decode=34", range(0, 34)),
                                       ("prefill=130,decode=2", range(130, 132))])
def test_record_lanes_at_two_sm_granularity(sim, text, sms):
    pset = TpcBackend(h100()).open(SMSplit.parse(text))
    assert pset.lane("decode").observed_sms == frozenset(sms)
    pset.close()


def test_record_overlap_lanes_share_the_middle(sim):
    pset = TpcBackend(h100()).open(SMSplit(prefill=100, decode=64, overlap=True))
    shared = pset.lane("prefill").observed_sms & pset.lane("decode").observed_sms
    assert shared == frozenset(range(68, 100)) and not pset.disjoint
    pset.close()


def test_record_map_is_probed_once_per_mechanism_then_cached(sim):
    expected = TpcMap.linear(132, uuid="GPU-sim", driver="13000/580.159.04/record@0x51c")
    assert TpcBackend(h100()).tpc_map() == expected
    assert sim.probes == 67 and not sim.streams  # probe stream destroyed
    TpcBackend(h100()).tpc_map()
    assert sim.probes == 67


def test_a_new_stream_whose_record_is_not_empty_is_refused(sim, monkeypatch):
    monkeypatch.setenv(mechanism.MECHANISM_ENV, "record")
    sim.new_stream_record = [0, 0, 0, 7, 0]
    with pytest.raises(UnsupportedError, match="not an empty record: the offset is wrong for driver 13000"):
        TpcBackend(h100()).new_stream()
    assert not sim.streams and sim.records_at_destroy == [[0, 0, 0, 7, 0]]  # left as found


def test_a_stream_whose_first_word_is_not_a_pointer_is_refused(sim, monkeypatch):
    original = sim.create

    def create_broken(device_index):
        handle, stream = original(device_index)
        sim.streams[handle].set_struct_pointer(0)
        return handle, stream

    monkeypatch.setattr(streams, "create_stream", create_broken)
    with pytest.raises(UnsupportedError, match="cannot read the stream-mask record.*not a pointer to a stream struct"):
        TpcBackend(h100()).new_stream()
    assert not sim.streams


def test_a_record_changed_behind_our_back_is_not_overwritten(sim):
    ms = TpcBackend(h100()).new_stream()
    ms.set(TpcMask.range(0, 8))
    fake = sim.streams[ms.handle]
    fake.poke([1, 0, 0, 0, 5])
    with pytest.raises(UnsupportedError, match="changed behind our back"):
        ms.set(TpcMask.range(0, 4))
    assert fake.record == [1, 0, 0, 0, 5]
    with pytest.warns(RuntimeWarning, match="not restoring"):
        ms.close()
    assert ms.handle is None and not sim.streams


def test_an_empty_mask_is_refused(sim):
    ms = TpcBackend(h100()).new_stream()
    with pytest.raises(InvalidSplitError, match="never finish"):
        ms.set(TpcMask())
    ms.close()


def test_auto_falls_back_to_the_hook_where_the_record_does_not_verify(sim, fake_hook_state):
    sim.honour = False  # what a wrong offset looks like from outside: masks restrict nothing
    backend = TpcBackend(h100())
    with pytest.warns(RuntimeWarning, match="stream record did not verify.*falling back to the launch hook"):
        assert backend.mechanism == "hook"
    assert not sim.streams and not fake_hook_state["installed"]  # nothing installed until a hook lane opens


def test_forced_record_that_does_not_verify_is_refused(sim, monkeypatch):
    monkeypatch.setenv(mechanism.MECHANISM_ENV, "record")
    sim.honour = False
    with pytest.raises(PartitionVerificationError, match=r"\(record\) could not map mask bits to SMs on driver 13.0"):
        TpcBackend(h100()).open(SMSplit(decode=16))
    assert not sim.streams


def test_an_escaping_record_lane_fails_verification(sim):
    backend = TpcBackend(h100())
    backend.tpc_map()
    sim.honour = False
    with pytest.raises(PartitionVerificationError, match="escaped its mask"):
        backend.open(SMSplit(decode=16))
    assert not sim.streams  # released on failure


def test_describe_names_the_mechanism(sim, monkeypatch):
    from bullet_kernels.partition.green import GreenBackend
    from bullet_kernels.partition.none import NoneBackend

    assert TpcBackend(h100()).describe() == "stream record at *(CUstream)+0x51c (logical TPC bits)"
    monkeypatch.setenv(mechanism.MECHANISM_ENV, "hook")
    assert TpcBackend(h100()).describe() == "launch hook (physical descriptor bits, thread-scoped lanes)"
    assert TpcBackend(None).describe() == ""
    assert GreenBackend(h100()).describe() == "green contexts (cuGreenCtxStreamCreate streams)"
    assert NoneBackend(None).describe().startswith("no restriction")


# ---- green and tpc in one process ------------------------------------------------------------------------


class DriverReached(Exception):
    """Raised where green would call the driver: its hook-state guard let it through."""


def _green_gets_past_its_guard(monkeypatch) -> bool:
    from bullet_kernels.partition import green

    def no_driver():
        raise DriverReached

    monkeypatch.setattr(green, "driver_module", no_driver)
    try:
        green.GreenBackend(h100()).open(SMSplit(prefill=96, decode=36))
    except DriverReached:
        return True
    except UnsupportedError as exc:
        assert "launch hook is installed" in str(exc) and "CUDA_ERROR_NOT_SUPPORTED" in str(exc)
        return False
    raise AssertionError("green neither refused nor reached the driver")


def test_green_stays_usable_beside_record_lanes(sim, monkeypatch):
    assert _green_gets_past_its_guard(monkeypatch)
    TpcBackend(h100()).open(SMSplit(decode=16)).close()
    assert _green_gets_past_its_guard(monkeypatch)


def test_green_is_refused_once_hook_lanes_are_opened(hook_sim, monkeypatch):
    assert _green_gets_past_its_guard(monkeypatch)
    TpcBackend(h100()).open(SMSplit(decode=16)).close()
    assert not _green_gets_past_its_guard(monkeypatch)


# ---- the hook mechanism: the real C callback writes fake descriptors --------------------------------------


def test_hook_map_is_the_physical_descriptor_layout(hook_sim):
    backend = TpcBackend(h100())
    assert backend.mechanism == "hook"
    tmap = backend.tpc_map()
    assert tmap.bits == hook_sim.layout.bits and tmap.driver == "13000/580.159.04/hook"
    assert diagnostics.descriptor_map(backend) is tmap
    assert not hook_sim.streams  # the probe stream is gone


def test_hook_lanes_hold_only_inside_their_scope(hook_sim, lib):
    pset = TpcBackend(h100()).open(SMSplit(prefill=96, decode=36))
    assert pset.needs_scope
    everything = frozenset(range(132))
    for lane in pset.lanes.values():  # open() verified inside each scope
        assert lane.observed_sms == lane.expected_sms and len(lane.expected_sms) == lane.granted
    assert not pset.lane("prefill").expected_sms & pset.lane("decode").expected_sms
    with pset.lane_scope("decode"):
        assert hook_sim.launch() == pset.lane("decode").expected_sms
        with pset.lane_scope("prefill"):  # nested: the innermost lane wins
            assert hook_sim.launch() == pset.lane("prefill").expected_sms
        assert hook_sim.launch() == pset.lane("decode").expected_sms
    assert hook_sim.launch() == everything  # outside any scope: the whole GPU
    assert lib.hook_stats()["thread_writes"] >= 5
    pset.close()
    assert not hook_sim.streams


def test_hook_lane_that_escapes_fails_verification(hook_sim, lib, monkeypatch):
    backend = TpcBackend(h100())
    backend.tpc_map()
    monkeypatch.setattr(lib, "set_thread_mask", lambda words: None)  # a hook that does nothing
    with pytest.raises(PartitionVerificationError, match="escaped its mask"):
        backend.open(SMSplit(decode=16))
    assert not hook_sim.streams


def test_next_launch_mask_refuses_masks_with_no_live_tpc(hook_sim):
    backend = TpcBackend(h100())
    dead = TpcMask.range(84, 128)  # no live descriptor bit up there
    with pytest.raises(InvalidSplitError, match="would never finish"):
        with diagnostics.next_launch_mask(backend, dead):
            pass
    with diagnostics.next_launch_mask(backend, TpcMask.of(0)):
        assert hook_sim.launch() == hook_sim.layout.bits[0]
    assert hook_sim.launch() == frozenset(range(132))  # consumed
