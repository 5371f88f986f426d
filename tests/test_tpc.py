"""TPC-mask backend without a GPU: mask arithmetic, placement, the TPC map, the C library."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bullet_kernels.errors import InvalidSplitError
from bullet_kernels.partition import SMSplit, backend_class, grant_tpc
from bullet_kernels.partition import tpc_native
from bullet_kernels.partition.tpc_mask import (
    N_BITS,
    TpcMap,
    TpcMapError,
    TpcMask,
    cache_path,
    load_cached,
    place_lanes,
    probe_map,
    save_cached,
)

REPO = Path(__file__).resolve().parent.parent


# ---- TpcMask ------------------------------------------------------------------------------------


def test_mask_set_operations():
    a, b = TpcMask.range(0, 8), TpcMask.of(4, 9, 127)
    assert list(a | b) == [*range(8), 9, 127]
    assert list(a & b) == [4]
    assert list(a - b) == [0, 1, 2, 3, 5, 6, 7]
    assert a.union(b) == a | b and a.intersection(b) == a & b
    assert len(a) == a.popcount() == 8
    assert 127 in b and 128 not in b and "x" not in b
    assert not TpcMask() and TpcMask.of(0)


def test_mask_complement_within_n():
    assert list(TpcMask.range(0, 60).complement(66)) == list(range(60, 66))
    assert len(TpcMask.of(3).complement()) == N_BITS - 1


def test_disabled_words_are_the_complement_in_four_uint32():
    mask = TpcMask.range(0, 8) | TpcMask.of(64, 65)
    assert mask.disabled_words() == [0xFFFFFF00, 0xFFFFFFFF, 0xFFFFFFFC, 0xFFFFFFFF]
    assert TpcMask.from_disabled_words(mask.disabled_words()) == mask
    assert TpcMask.all().disabled_words() == [0, 0, 0, 0]


def test_hex_and_range_text_round_trip():
    mask = TpcMask.from_ranges("0-7,64-65")
    assert str(mask) == "0-7,64-65" and repr(mask) == "TpcMask(0-7,64-65)"
    assert TpcMask.from_hex(mask.hex()) == mask
    assert mask.hex() == hex((1 << 64) | (1 << 65) | 0xFF)
    assert repr(TpcMask()) == "TpcMask(empty)"


@pytest.mark.parametrize(
    "bad",
    [lambda: TpcMask.of(128), lambda: TpcMask.of(-1), lambda: TpcMask(1 << 128), lambda: TpcMask.range(5, 4),
     lambda: TpcMask.from_ranges("0-x"), lambda: TpcMask.from_hex("zz"), lambda: TpcMask.from_disabled_words([0] * 3)],
)
def test_mask_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        bad()


def test_mask_is_immutable_and_hashable():
    mask = TpcMask.of(1)
    with pytest.raises(AttributeError):
        mask._bits = 3
    assert {mask: 1}[TpcMask.of(1)] == 1


# ---- placement ----------------------------------------------------------------------------------


def test_disjoint_lanes_sit_side_by_side_from_tpc0():
    granted = grant_tpc(SMSplit(prefill=96, decode=36), 132)
    assert place_lanes(granted, 66, overlap=False) == {"prefill": range(0, 48), "decode": range(48, 66)}


def test_odd_counts_round_up_to_whole_tpcs():
    granted = grant_tpc(SMSplit(prefill=95, decode=35), 132)
    assert granted == {"prefill": 96, "decode": 36}
    assert place_lanes(granted, 66, overlap=False)["decode"] == range(48, 66)


def test_overlap_places_first_lane_low_second_high():
    split = SMSplit(prefill=100, decode=64, overlap=True)
    places = place_lanes(grant_tpc(split, 132), 66, overlap=True)
    assert places == {"prefill": range(0, 50), "decode": range(34, 66)}
    assert set(places["prefill"]) & set(places["decode"]) == set(range(34, 50))


def test_placement_refuses_what_does_not_fit():
    with pytest.raises(InvalidSplitError, match="this GPU has 66"):
        place_lanes({"a": 100, "b": 40}, 66, overlap=False)
    with pytest.raises(InvalidSplitError, match="allowed: 1..66"):
        place_lanes({"a": 134}, 66, overlap=False)


# ---- TpcMap -------------------------------------------------------------------------------------


def test_linear_map_matches_h100_measurement():
    tmap = TpcMap.linear(132).validate()
    assert tmap.tpc_count == 66 and tmap.live == TpcMask.range(0, 66)
    assert tmap.sms(TpcMask.of(0, 65)) == {0, 1, 130, 131}
    assert tmap.mask_for(range(2, 4)) == TpcMask.of(2, 3)


def test_map_with_floorswept_bits_numbers_logical_tpcs_by_live_bits():
    bits = [frozenset()] * N_BITS
    bits[1], bits[3], bits[4] = frozenset({0, 1}), frozenset({2, 3}), frozenset({4, 5})
    tmap = TpcMap(6, tuple(bits)).validate()
    assert tmap.live_bits == (1, 3, 4)
    assert tmap.mask_for(range(0, 2)) == TpcMask.of(1, 3)
    with pytest.raises(ValueError, match="out of range"):
        tmap.mask_for(range(0, 4))


def test_map_json_round_trip():
    tmap = TpcMap.linear(132, uuid="GPU-1234", driver="13000/580.159.04")
    again = TpcMap.from_json(tmap.to_json())
    assert again == tmap


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["bits"].__setitem__("1", [0, 1]), "reached by bits 0 and 1"),
        (lambda d: d["bits"].pop("65"), "SMs 130-131 are reached by no bit"),
        (lambda d: d["bits"].__setitem__("65", [130, 132]), "outside 0..131"),
        (lambda d: d["bits"].__setitem__("128", [5]), "allowed: 0..127"),
        (lambda d: d.__setitem__("format", 99), "format 99"),
        (lambda d: d.pop("sm_count"), "cannot read"),
    ],
)
def test_map_validation_failures_say_what_is_wrong(edit, message):
    doc = json.loads(TpcMap.linear(132).to_json())
    edit(doc)
    with pytest.raises(TpcMapError, match=message):
        TpcMap.from_json(json.dumps(doc))


def test_cache_round_trip_and_staleness(tmp_path, monkeypatch):
    monkeypatch.setenv("BULLET_CACHE_DIR", str(tmp_path))
    tmap = TpcMap.linear(132, uuid="GPU-ab", driver="13000/580")
    path = save_cached(tmap)
    assert path.parent == tmp_path and path == cache_path("GPU-ab", "13000/580")
    assert load_cached("GPU-ab", "13000/580", 132) == (tmap, "")
    assert load_cached("GPU-ab", "13010/590", 132)[0] is None  # new driver: re-probe
    doc = json.loads(path.read_text())
    doc["bits"]["65"] = [129, 131]  # SM 129 twice, SM 130 nowhere
    path.write_text(json.dumps(doc))
    got, why = load_cached("GPU-ab", "13000/580", 132)
    assert got is None and "unusable" in why


def _fake_gpu(bits: list[frozenset[int]], sm_count: int):
    """observe() of a GPU whose bit b reaches bits[b]; fails like a hung kernel on no SM."""
    launched = []

    def observe(mask: TpcMask) -> frozenset[int]:
        sms = frozenset().union(*(bits[b] for b in mask if b < len(bits)))
        assert sms, f"launched with no live TPC: {mask!r}"  # on a GPU this never finishes
        launched.append(mask)
        return sms

    return observe, launched


def test_probe_map_finds_h100_layout_and_stops_early():
    linear = TpcMap.linear(132)
    observe, launched = _fake_gpu(list(linear.bits[:66]), 132)
    assert probe_map(observe, 132).bits == linear.bits
    assert len(launched) == 1 + 66


def test_probe_map_survives_floorswept_bit0():
    bits = [frozenset(), frozenset({2, 3}), frozenset(), frozenset({0, 1})]
    observe, _ = _fake_gpu(bits, 4)
    tmap = probe_map(observe, 4)
    assert tmap.live_bits == (1, 3) and tmap.bits[3] == {0, 1}


def test_probe_map_refuses_when_masks_do_nothing():
    with pytest.raises(TpcMapError, match="reached by no bit"):
        probe_map(lambda mask: frozenset(range(8)), 8)  # e.g. a wrong offset: masks ignored
    with pytest.raises(TpcMapError, match="ran on 6 of 8"):
        probe_map(lambda mask: frozenset(range(6)), 8)


# ---- backend without a GPU ------------------------------------------------------------------------


def test_unavailable_without_gpu():
    assert backend_class("tpc").unavailable_reason(None) == "no GPU"


def test_missing_library_reason_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv("BULLET_TPC_LIB", str(tmp_path / "nope.so"))
    tpc_native._load.cache_clear()
    try:
        why = tpc_native.unavailable_reason()
    finally:
        monkeypatch.delenv("BULLET_TPC_LIB")
        tpc_native._load.cache_clear()
    assert why.startswith("native library not built") and "C compiler" in why and "nope.so" in why


# ---- the C library through ctypes -------------------------------------------------------------------


@pytest.fixture(scope="session")
def native(tmp_path_factory) -> tpc_native.NativeLib:
    """The library built from this checkout's csrc/ (so the test sees current source), else an
    installed copy, else skip."""
    cmake, cc = shutil.which("cmake"), shutil.which("cc") or shutil.which("gcc")
    if cmake and cc:
        build = tmp_path_factory.mktemp("tpc_build")
        for cmd in ([cmake, "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                    [cmake, "--build", str(build)]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "warning:" not in done.stdout + done.stderr, done.stdout + done.stderr
        return tpc_native.NativeLib(build / tpc_native.LIB_NAME)
    if not tpc_native.unavailable_reason():
        return tpc_native.load()
    pytest.skip("no C compiler / cmake, and no built libbullet_tpc.so")


def test_offset_table(native):
    assert native.stream_mask_offset(13000) == 0x51C
    assert native.stream_mask_offset(12080) == native.stream_mask_offset(12070) == 0x4FC
    assert native.stream_mask_offset(12030) == 0x49C
    for unknown in (11080, 12090, 13010, 0, -1):
        assert native.stream_mask_offset(unknown) is None
    assert len(native.known_offsets()) == 10


def test_unknown_driver_is_refused_unless_overridden(native, monkeypatch):
    from bullet_kernels.partition.tpc import stream_offset

    monkeypatch.delenv("BULLET_TPC_STREAM_OFFSET", raising=False)
    offset, why = stream_offset(native, 13010)
    assert offset is None
    assert why.startswith("driver API version 13010 has no known stream-mask offset; known: 12000, 12010")
    assert "BULLET_TPC_STREAM_OFFSET" in why and "still verified" in why
    monkeypatch.setenv("BULLET_TPC_STREAM_OFFSET", "0x51c")
    assert stream_offset(native, 13010) == (0x51C, "")
    monkeypatch.setenv("BULLET_TPC_STREAM_OFFSET", "0x51d")
    assert "multiple of 4" in stream_offset(native, 13010)[1]


def test_stream_record_read_write_clear(native):
    fake_stream = ctypes.create_string_buffer(0x600)  # stands in for the driver's stream object
    ptr = ctypes.addressof(fake_stream)
    assert native.read_record(ptr, 0x51C) == [0] * 5
    native.set_stream_mask(ptr, 0x51C, [1, 2, 3, 0xFFFFFFFF])
    assert native.read_record(ptr, 0x51C) == [1, 1, 2, 3, 0xFFFFFFFF]
    native.write_record(ptr, 0x51C, [0, 0, 0, 0, 7])
    assert native.read_record(ptr, 0x51C) == [0, 0, 0, 0, 7]
    native.clear_stream_mask(ptr, 0x51C)
    assert native.read_record(ptr, 0x51C) == [0] * 5
    assert fake_stream.raw[:0x51C] == bytes(0x51C)  # nothing written outside the record


@pytest.mark.parametrize("stream, offset, message", [(0, 0x51C, "special stream"), (2, 0x51C, "special stream"),
                                                     (1 << 20, 0x51D, "multiple of 4"), (1 << 20, -4, "multiple of 4")])
def test_stream_record_refuses_bad_arguments(native, stream, offset, message):
    with pytest.raises(tpc_native.TpcNativeError, match=message):
        native.read_record(stream, offset)


class FakeLaunch:
    """params words + a descriptor buffer, as the driver hands them to the launch callback."""

    def __init__(self, version_at: dict[int, int], size: int = 40, qmd_bytes: int = 512):
        self.qmd = ctypes.create_string_buffer(qmd_bytes)
        for at, value in version_at.items():
            self.qmd[at] = value
        self.params = (ctypes.c_uint64 * 5)(size, 0, 0, 0, ctypes.addressof(self.qmd))

    def u32(self, at: int) -> int:
        return int.from_bytes(self.qmd.raw[at : at + 4], "little")

    def fire(self, native, domain=0xB, cbid=0x1):
        native.hook_callback(domain, cbid, ctypes.addressof(self.params))


@pytest.fixture
def hook(native):
    native.hook_reset_stats()
    native.set_next_mask(None)
    native.set_global_mask(None)
    yield native
    native.set_next_mask(None)
    native.set_global_mask(None)


MASK = TpcMask.range(0, 8) | TpcMask.of(100)


@pytest.mark.parametrize(
    "version_at, words_at, enable_at",
    [({72: 0x40}, [304, 308, 312, 316], 0), ({72: 0x4F}, [304, 308, 312, 316], 0),
     ({72: 0, 58: 0x50}, [280, 284, 288, 292], 16), ({72: 0x16}, [84, 88], None), ({72: 0x3F}, [84, 88], None)],
)
def test_next_mask_is_written_into_known_descriptors(hook, version_at, words_at, enable_at):
    launch = FakeLaunch(version_at)
    hook.set_next_mask(MASK.disabled_words())
    launch.fire(hook)
    assert [launch.u32(at) for at in words_at] == MASK.disabled_words()[: len(words_at)]
    if enable_at is not None:
        assert launch.u32(enable_at) >> 31 == 1
    stats = hook.hook_stats()
    assert (stats["writes"], stats["skips"], stats["last_params_size"]) == (1, 0, 40)
    assert stats["last_qmd_version"] == max(version_at.values())
    launch2 = FakeLaunch(version_at)
    launch2.fire(hook)  # consumed: the next launch is untouched
    assert launch2.qmd.raw == FakeLaunch(version_at).qmd.raw


@pytest.mark.parametrize("version_at, size", [({72: 0x15}, 40), ({72: 0x60}, 40), ({72: 0, 58: 0x4F}, 40),
                                              ({72: 0, 58: 0x60}, 40), ({72: 0x40}, 32)])
def test_unknown_descriptor_or_short_params_are_skipped_untouched(hook, version_at, size):
    launch = FakeLaunch(version_at, size=size)
    before = launch.qmd.raw
    hook.set_next_mask(MASK.disabled_words())
    launch.fire(hook)
    assert launch.qmd.raw == before
    stats = hook.hook_stats()
    assert (stats["writes"], stats["skips"], stats["last_params_size"]) == (0, 1, size)


def test_other_callbacks_and_no_mask_write_nothing(hook):
    launch = FakeLaunch({72: 0x40})
    before = launch.qmd.raw
    launch.fire(hook)  # no mask pending
    hook.set_next_mask(MASK.disabled_words())
    launch.fire(hook, domain=0x6)  # another domain: ignored, and the mask stays pending
    assert launch.qmd.raw == before
    stats = hook.hook_stats()
    assert (stats["calls"], stats["writes"], stats["skips"]) == (2, 0, 0)
    hook.hook_callback(0xB, 0x1, None)  # NULL params: counted as a skip, no crash
    assert hook.hook_stats()["skips"] == 1


def test_global_mask_fills_only_unmasked_descriptors(hook):
    hook.set_global_mask(MASK.disabled_words())
    plain, masked, enable_only = (FakeLaunch({72: 0x40}) for _ in range(3))
    masked.qmd[3] = enable_only.qmd[3] = 0x80  # enable bit 31 of the u32 at byte 0
    masked.qmd[316] = 0xFF  # ... and a stream mask disabling TPCs 96..103
    for launch in (plain, masked, enable_only):
        launch.fire(hook)
    assert plain.u32(304) == enable_only.u32(304) == MASK.disabled_words()[0]  # a zero mask is no mask
    assert masked.u32(304) == 0 and masked.u32(316) == 0xFF  # the stream's mask wins
    hook.set_global_mask(None)
    again = FakeLaunch({72: 0x40})
    again.fire(hook)
    assert again.u32(304) == 0 and hook.hook_stats()["writes"] == 2


def test_next_mask_overrides_a_stream_mask(hook):
    launch = FakeLaunch({72: 0x40})
    launch.qmd[3], launch.qmd[316] = 0x80, 0xFF
    hook.set_next_mask(MASK.disabled_words())
    launch.fire(hook)
    assert launch.u32(304) == MASK.disabled_words()[0]


def test_hook_install_without_driver_reports_instead_of_crashing(native):
    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("this machine has a CUDA driver")
    except OSError:
        pass
    with pytest.raises(tpc_native.TpcNativeError, match="cannot load libcuda.so.1"):
        native.hook_install()
    assert native.hook_stats()["installed"] == 0


def test_c_selftest_passes(native):
    exe = native.path.parent / "tpc_mask_selftest"
    if not exe.exists():
        pytest.skip("self test is built only by a plain CMake build")
    assert subprocess.run([str(exe)], capture_output=True).returncode == 0


# ---- TpcBackend on a simulated GPU: real C record writes into fake stream objects -----------------


class FakeStream(int):
    """Stands in for torch's ExternalStream: the handle, plus a no-op synchronize."""

    def synchronize(self) -> None:
        pass


class SimulatedGpu:
    """Streams are zeroed buffers the C library writes masks into; the probe reads them back
    and runs on the SMs that the H100 layout (bit b -> SMs 2b, 2b+1) allows."""

    def __init__(self, native, offset=0x51C, sm_count=132, honour_masks=True):
        self.native, self.offset, self.sm_count, self.honour = native, offset, sm_count, honour_masks
        self.layout = TpcMap.linear(sm_count)
        self.streams: dict[int, ctypes.Array] = {}
        self.probes = 0
        self.dirty_new_streams = False
        self.records_at_destroy: list[list[int]] = []

    def create(self, device_index):
        buf = ctypes.create_string_buffer(0x800)
        if self.dirty_new_streams:
            ctypes.memmove(ctypes.addressof(buf) + self.offset, b"\x07" * 20, 20)
        handle = ctypes.addressof(buf)
        self.streams[handle] = buf
        return handle, FakeStream(handle)

    def destroy(self, device_index, handle):
        self.records_at_destroy.append(self.native.read_record(handle, self.offset))
        del self.streams[handle]

    def observed_sms(self, stream, sm_count, device_index=0, waves=4, spin_us=20):
        self.probes += 1
        enabled, *words = self.native.read_record(stream, self.offset)
        mask = TpcMask.from_disabled_words(words) if enabled and self.honour else TpcMask.all()
        return self.layout.sms(mask)


def simulate(gpu, native, monkeypatch, tmp_path):
    """Route the tpc backend's streams, probes and library to a simulated GPU."""
    from bullet_kernels.partition import tpc

    monkeypatch.setattr(tpc_native, "_load", lambda: (native, ""))
    monkeypatch.setattr(tpc, "_create_stream", gpu.create)
    monkeypatch.setattr(tpc, "_destroy_stream", gpu.destroy)
    monkeypatch.setattr(tpc.probe, "observed_sms", gpu.observed_sms)
    monkeypatch.setenv("BULLET_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BULLET_TPC_STREAM_OFFSET", raising=False)
    monkeypatch.delenv("BULLET_TPC_MECHANISM", raising=False)
    return gpu


@pytest.fixture
def sim(native, monkeypatch, tmp_path):
    from bullet_kernels.partition import tpc

    gpu = simulate(SimulatedGpu(native), native, monkeypatch, tmp_path)
    # The simulated driver honours the table offset (the real 13000 one was refuted on the H100).
    monkeypatch.setattr(tpc, "REFUTED_OFFSETS", {})
    return gpu


def test_refuted_table_offset_is_never_used_without_the_override(native, monkeypatch):
    from bullet_kernels.partition.tpc import OFFSET_ENV, stream_offset

    monkeypatch.delenv(OFFSET_ENV, raising=False)
    offset, why = stream_offset(native, 13000)
    assert offset is None
    assert "0x51c of driver API version 13000 is refuted" in why and "restricted nothing" in why
    monkeypatch.setenv(OFFSET_ENV, "0x51c")
    assert stream_offset(native, 13000) == (0x51C, "")


def _h100(**changes):
    from bullet_kernels.device import DeviceInfo

    facts = dict(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-sim", sm_count=132, tpc_count=66,
                 compute_capability=(9, 0), driver_api_version=13000, kernel_driver="580.159.04",
                 total_memory_bytes=80 << 30, l2_bytes=50 << 20, green_contexts=True, green_unavailable_reason="",
                 min_partition_sms=8, partition_alignment_sms=8)
    return DeviceInfo(**{**facts, **changes})


def test_sim_disjoint_lanes_get_masked_streams_and_close_restores_them(sim):
    from bullet_kernels.partition.tpc import TpcBackend

    backend = TpcBackend(_h100())
    pset = backend.open(SMSplit(prefill=96, decode=35))
    prefill, decode = pset.lane("prefill"), pset.lane("decode")
    assert prefill.expected_sms == prefill.observed_sms == frozenset(range(96))
    assert decode.expected_sms == decode.observed_sms == frozenset(range(96, 132))
    assert (decode.asked, decode.granted) == (35, 36)
    assert sim.native.read_record(decode.stream, 0x51C) == [1, *TpcMask.range(48, 66).disabled_words()]
    pset.close()
    assert not sim.streams and sim.records_at_destroy[-2:] == [[0] * 5] * 2  # restored, then destroyed


def test_sim_overlap_lanes_share_the_middle(sim):
    from bullet_kernels.partition.tpc import TpcBackend

    pset = TpcBackend(_h100()).open(SMSplit(prefill=100, decode=64, overlap=True))
    shared = pset.lane("prefill").observed_sms & pset.lane("decode").observed_sms
    assert shared == frozenset(range(68, 100)) and not pset.disjoint
    pset.close()


def test_sim_map_is_probed_once_then_read_from_the_cache(sim):
    from bullet_kernels.partition.tpc import TpcBackend

    assert TpcBackend(_h100()).tpc_map() == TpcMap.linear(132, uuid="GPU-sim", driver="13000/580.159.04/record")
    assert sim.probes == 67 and not sim.streams  # probe stream destroyed
    TpcBackend(_h100()).tpc_map()
    assert sim.probes == 67


def test_sim_refuses_a_record_that_is_not_empty(sim):
    from bullet_kernels.errors import UnsupportedError
    from bullet_kernels.partition.tpc import TpcBackend

    sim.dirty_new_streams = True
    with pytest.raises(UnsupportedError, match="not an empty record: the offset is wrong for driver 13000"):
        TpcBackend(_h100()).new_stream()
    assert not sim.streams


def test_sim_refuses_a_record_changed_behind_our_back(sim):
    from bullet_kernels.errors import UnsupportedError
    from bullet_kernels.partition.tpc import TpcBackend

    ms = TpcBackend(_h100()).new_stream()
    ms.set(TpcMask.range(0, 8))
    sim.native.write_record(ms.handle, 0x51C, [1, 0, 0, 0, 5])
    with pytest.raises(UnsupportedError, match="changed behind our back"):
        ms.set(TpcMask.range(0, 4))
    ms.close()


def test_sim_masks_that_do_nothing_fail_verification(sim):
    from bullet_kernels.errors import PartitionVerificationError
    from bullet_kernels.partition.tpc import TpcBackend

    sim.honour = False  # what a wrong offset looks like from outside
    with pytest.raises(PartitionVerificationError, match="could not map mask bits to SMs on driver 13.0"):
        TpcBackend(_h100()).open(SMSplit(decode=16))
    assert not sim.streams


def test_sim_escaping_lane_fails_verification(sim):
    from bullet_kernels.errors import PartitionVerificationError
    from bullet_kernels.partition.tpc import TpcBackend

    backend = TpcBackend(_h100())
    backend.tpc_map()
    sim.honour = False
    with pytest.raises(PartitionVerificationError, match="escaped its mask"):
        backend.open(SMSplit(decode=16))
    assert not sim.streams  # released on failure


def test_sim_unavailable_reasons(sim, monkeypatch):
    from bullet_kernels.partition.tpc import TpcBackend

    assert TpcBackend.unavailable_reason(_h100()) == ""
    assert TpcBackend.unavailable_reason(_h100(driver_api_version=13010)) == ""  # auto: the hook
    monkeypatch.setenv("BULLET_TPC_MECHANISM", "record")  # the record alone needs a known offset
    why = TpcBackend.unavailable_reason(_h100(driver_api_version=13010))
    assert "driver API version 13010 has no known stream-mask offset" in why
    monkeypatch.setenv("BULLET_TPC_STREAM_OFFSET", "0x51c")
    assert TpcBackend.unavailable_reason(_h100(driver_api_version=13010)) == ""
    monkeypatch.setenv("BULLET_TPC_MECHANISM", "magic")
    assert "BULLET_TPC_MECHANISM='magic' is not one of auto, record, hook" in TpcBackend.unavailable_reason(_h100())
    monkeypatch.delenv("BULLET_TPC_MECHANISM")
    assert "compute capability 6.1 < 7.0" in TpcBackend.unavailable_reason(_h100(compute_capability=(6, 1)))
    monkeypatch.setattr(tpc_native, "_load", lambda: (None, "native library not built: ..."))
    assert TpcBackend.unavailable_reason(_h100()).startswith("native library not built")


def test_sim_hook_helpers_refuse_masks_with_no_live_tpc(sim):
    from bullet_kernels.partition.tpc import TpcBackend

    backend = TpcBackend(_h100())
    backend._maps["hook"] = TpcMap.linear(132)  # descriptor bits, as if probed
    with pytest.raises(InvalidSplitError, match="would never finish"):
        with backend.next_launch_mask(TpcMask.range(66, 128)):
            pass


# ---- the hook mechanism, simulated: the real C callback writes fake descriptors -----------------------


def floorswept_layout(sm_count: int = 132) -> TpcMap:
    """Descriptor bits as measured on the H100 (tpc-diagnose-h100-20261126.json): physical TPC ids,
    interleaved across GPCs, with dead bits in between. Here: bit b -> SMs of TPC perm[b]."""
    live = [b for b in range(84) if b not in (4, 5, 6, 7, 8, 17, 26, 35, 44, 53, 72, 73, 74, 76, 77, 79, 80, 82)]
    bits = [frozenset()] * N_BITS
    for i, b in enumerate(live[: sm_count // 2]):
        tpc = (i * 17) % (sm_count // 2)  # a fixed permutation of the logical TPCs
        bits[b] = frozenset({2 * tpc, 2 * tpc + 1})
    return TpcMap(sm_count, tuple(bits)).validate()


class SimulatedHookGpu:
    """Every probe 'launch' runs our C callback on a fresh Hopper descriptor, exactly as the
    driver would, and then runs on the SMs the written mask allows under ``layout``."""

    def __init__(self, native):
        self.native, self.layout = native, floorswept_layout()
        self.streams: set[int] = set()
        self.launches = 0

    def create(self, device_index):
        handle = 0x10000 + 0x100 * len(self.streams) + self.launches
        self.streams.add(handle)
        return handle, FakeStream(handle)

    def destroy(self, device_index, handle):
        self.streams.remove(handle)

    def launch(self) -> frozenset[int]:
        self.launches += 1
        launch = FakeLaunch({72: 0x40}, size=88)
        launch.fire(self.native)
        if not launch.u32(0) >> 31:
            return frozenset(range(self.layout.sm_count))
        words = [launch.u32(304 + 4 * i) for i in range(4)]
        return self.layout.sms(TpcMask.from_disabled_words(words))

    def observed_sms(self, stream, sm_count, device_index=0, waves=4, spin_us=20):
        return self.launch()

    def observed_sms_next_launch(self, lib, stream, sm_count, disabled_words, device_index=0, waves=2, spin_us=5):
        lib.set_next_mask(disabled_words)
        try:
            return self.launch()
        finally:
            lib.set_next_mask(None)


@pytest.fixture
def hook_sim(native, monkeypatch, tmp_path):
    from bullet_kernels.partition import tpc

    gpu = simulate(SimulatedHookGpu(native), native, monkeypatch, tmp_path)
    monkeypatch.setattr(tpc.probe, "observed_sms_next_launch", gpu.observed_sms_next_launch)
    monkeypatch.setattr(tpc.TpcBackend, "_hook", lambda self: native)  # no driver to subscribe to
    native.hook_reset_stats()
    yield gpu
    native.set_thread_mask(None)


def test_hook_sim_auto_picks_the_hook_where_the_table_offset_is_refuted(hook_sim):
    from bullet_kernels.partition.tpc import TpcBackend

    backend = TpcBackend(_h100())
    assert backend.mechanism == "hook"
    tmap = backend.tpc_map()
    assert tmap.bits == hook_sim.layout.bits and tmap.driver.endswith("/hook")
    assert not hook_sim.streams  # the probe stream is gone


def test_hook_sim_lanes_hold_only_inside_their_scope(hook_sim):
    from bullet_kernels.partition.tpc import TpcBackend

    pset = TpcBackend(_h100()).open(SMSplit(prefill=96, decode=36))
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
    assert hook_sim.native.hook_stats()["thread_writes"] >= 5
    pset.close()
    assert not hook_sim.streams


def test_hook_sim_escaping_lane_fails_verification(hook_sim, monkeypatch):
    from bullet_kernels.errors import PartitionVerificationError
    from bullet_kernels.partition.tpc import TpcBackend

    backend = TpcBackend(_h100())
    backend.tpc_map()
    monkeypatch.setattr(hook_sim.native, "set_thread_mask", lambda words: None)  # a hook that does nothing
    with pytest.raises(PartitionVerificationError, match="escaped its mask"):
        backend.open(SMSplit(decode=16))
    assert not hook_sim.streams


def test_hook_sim_record_mechanism_can_be_forced_and_is_refused_on_13000(hook_sim, monkeypatch):
    from bullet_kernels.errors import UnsupportedError
    from bullet_kernels.partition.tpc import TpcBackend

    monkeypatch.setenv("BULLET_TPC_MECHANISM", "record")
    with pytest.raises(UnsupportedError, match="0x51c of driver API version 13000 is refuted"):
        TpcBackend(_h100()).open(SMSplit(decode=16))


def test_thread_mask_and_size_word_high_half(native):
    native.hook_reset_stats()
    launch = FakeLaunch({72: 0x40}, size=0x7FFF00000058)  # driver 580: stack bytes above the size
    native.set_thread_mask(MASK.disabled_words())
    try:
        launch.fire(native)
    finally:
        native.set_thread_mask(None)
    assert launch.u32(304) == MASK.disabled_words()[0] and launch.u32(0) >> 31 == 1
    stats = native.hook_stats()
    assert stats["last_params_size"] == 0x58 and stats["thread_writes"] == 1
    again = FakeLaunch({72: 0x40}, size=88)
    again.fire(native)  # cleared: untouched
    assert again.u32(304) == 0


def test_trace_records_params_and_what_they_point_at(native):
    target = (ctypes.c_uint64 * 4)(7, 8, 9, 10)
    params = (ctypes.c_uint64 * 6)(48, ctypes.addressof(target), 2, 3, 4, 5)
    native.trace_start(2)
    native.hook_callback(0x7, 0x1, ctypes.addressof(params))  # another domain: traced, no descriptor read
    native.trace_start(0)
    (rec,) = native.trace_read()
    assert rec["size"] == 48 and rec["words"][1:] == [ctypes.addressof(target), 2, 3, 4, 5]
    assert rec["deref"][1][:4] == [7, 8, 9, 10] and 2 not in rec["deref"]  # 2 is no address
    assert native.peek(ctypes.addressof(target), 8) == (7).to_bytes(8, "little")
    assert native.peek(16, 8) is None


def test_green_refuses_new_contexts_once_the_hook_is_installed(monkeypatch):
    from bullet_kernels.errors import UnsupportedError
    from bullet_kernels.partition.green import GreenBackend

    monkeypatch.setattr(tpc_native, "_hook_installed", True)
    with pytest.raises(UnsupportedError, match="launch hook is installed .* CUDA_ERROR_NOT_SUPPORTED"):
        GreenBackend(_h100()).open(SMSplit(prefill=96, decode=36))


def test_hook_enable_needs_an_installed_hook(native):
    if native.hook_stats()["installed"]:
        pytest.skip("this process installed the real hook")
    with pytest.raises(tpc_native.TpcNativeError, match="hook is not installed"):
        native.hook_enable(False)
