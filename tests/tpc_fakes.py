"""Test helpers for the tpc backend without a GPU: the C library built from this checkout,
fake driver streams laid out as the driver lays them out, fake launches, simulated GPUs.

Imported by test_tpc_native.py and test_tpc_backend_sim.py (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from bullet_kernels.device import DeviceInfo
from bullet_kernels.partition.tpc import native
from bullet_kernels.partition.tpc.masks import N_BITS, TpcMap, TpcMask

REPO = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def build_native() -> native.NativeLib | None:
    """The library built from this checkout's csrc/ with CMake (so tests see the current
    source, never a stale installed copy), once per test process; None without cmake / cc."""
    cmake, cc = shutil.which("cmake"), shutil.which("cc") or shutil.which("gcc")
    if not (cmake and cc):
        return None
    build = Path(tempfile.mkdtemp(prefix="tpc_build_"))
    for cmd in ([cmake, "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"], [cmake, "--build", str(build)]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "warning:" not in done.stdout + done.stderr, done.stdout + done.stderr
    return native.NativeLib(build / native.LIB_NAME)


def native_or_skip() -> native.NativeLib:
    lib = build_native()
    if lib is not None:
        return lib
    if not native.unavailable_reason():
        return native.load()
    pytest.skip("no C compiler / cmake, and no built libbullet_tpc.so")


def u32s(buf, at: int, n: int) -> list[int]:
    """``n`` little-endian uint32 at byte ``at`` of a ctypes buffer, read in Python (not through
    the library under test)."""
    raw = ctypes.string_at(ctypes.addressof(buf) + at, 4 * n)
    return [int.from_bytes(raw[4 * i : 4 * i + 4], "little") for i in range(n)]


class FakeDriverStream:
    """A CUstream as the driver lays it out: the handle points at an object whose first word
    points at the stream struct, and the mask record is at struct + offset. The handle object
    is as large as the struct and holds other bytes at ``offset``, so a write at
    handle + offset (the old mistake) would show."""

    SIZE = 0x800

    def __init__(self, offset: int = 0x51C):
        self.offset = offset
        self.struct = ctypes.create_string_buffer(self.SIZE)
        self.obj = ctypes.create_string_buffer(self.SIZE)
        ctypes.memmove(ctypes.addressof(self.obj) + offset, b"\x5a" * 20, 20)
        self.set_struct_pointer(ctypes.addressof(self.struct))
        self.handle = ctypes.addressof(self.obj)

    def set_struct_pointer(self, pointer: int) -> None:
        ctypes.memmove(ctypes.addressof(self.obj), pointer.to_bytes(8, "little"), 8)

    @property
    def record(self) -> list[int]:
        return u32s(self.struct, self.offset, 5)

    def poke(self, record: list[int]) -> None:
        data = b"".join(w.to_bytes(4, "little") for w in record)
        ctypes.memmove(ctypes.addressof(self.struct) + self.offset, data, 20)


class FakeLaunch:
    """params words + a descriptor buffer, as the driver hands them to the launch callback."""

    def __init__(self, version_at: dict[int, int], size: int = 40, qmd_bytes: int = 512):
        self.qmd = ctypes.create_string_buffer(qmd_bytes)
        for at, value in version_at.items():
            self.qmd[at] = value
        self.params = (ctypes.c_uint64 * 5)(size, 0, 0, 0, ctypes.addressof(self.qmd))

    def u32(self, at: int) -> int:
        return u32s(self.qmd, at, 1)[0]

    def fire(self, lib, domain=0xB, cbid=0x1):
        lib.hook_callback(domain, cbid, ctypes.addressof(self.params))


class FakeStream(int):
    """Stands in for torch's ExternalStream: the handle, plus a no-op synchronize."""

    def synchronize(self) -> None:
        pass


def h100(**changes) -> DeviceInfo:
    facts = dict(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-sim", sm_count=132, tpc_count=66,
                 compute_capability=(9, 0), driver_api_version=13000, kernel_driver="580.159.04",
                 total_memory_bytes=80 << 30, l2_bytes=50 << 20, green_contexts=True, green_unavailable_reason="",
                 min_partition_sms=8, partition_alignment_sms=8)
    return DeviceInfo(**{**facts, **changes})


class SimulatedRecordGpu:
    """Streams are FakeDriverStreams the C library writes records into; a probe runs on the
    SMs the record at *(void**)handle + offset allows (bit b -> SMs 2b, 2b+1, as measured on
    the H200), read back in Python."""

    def __init__(self, offset: int = 0x51C, sm_count: int = 132):
        self.offset, self.layout = offset, TpcMap.linear(sm_count)
        self.streams: dict[int, FakeDriverStream] = {}
        self.probes = 0
        self.honour = True  # False: masks do nothing, as with a wrong offset
        self.new_stream_record: list[int] | None = None  # e.g. dirty records in new streams
        self.records_at_destroy: list[list[int]] = []

    def create(self, device_index):
        fake = FakeDriverStream(self.offset)
        if self.new_stream_record is not None:
            fake.poke(self.new_stream_record)
        self.streams[fake.handle] = fake
        return fake.handle, FakeStream(fake.handle)

    def destroy(self, device_index, handle):
        self.records_at_destroy.append(self.streams.pop(handle).record)

    def observed_sms(self, stream, sm_count, device_index=0, waves=4, spin_us=20):
        self.probes += 1
        enabled, *words = self.streams[int(stream)].record
        mask = TpcMask.from_disabled_words(words) if enabled and self.honour else TpcMask.all()
        return self.layout.sms(mask)


def floorswept_layout(sm_count: int = 132) -> TpcMap:
    """Descriptor bits as measured on the H100 (tpc-diagnose-h100-20261126.json): physical TPC
    ids, interleaved across GPCs, with dead bits in between. Here: bit b -> SMs of TPC perm[b]."""
    dead = (4, 5, 6, 7, 8, 17, 26, 35, 44, 53, 72, 73, 74, 76, 77, 79, 80, 82)
    live = [b for b in range(84) if b not in dead]
    bits = [frozenset()] * N_BITS
    for i, b in enumerate(live[: sm_count // 2]):
        tpc = (i * 17) % (sm_count // 2)  # a fixed permutation of the logical TPCs
        bits[b] = frozenset({2 * tpc, 2 * tpc + 1})
    return TpcMap(sm_count, tuple(bits)).validate()


class SimulatedHookGpu:
    """Every probe 'launch' runs our C callback on a fresh Hopper descriptor, exactly as the
    driver would, and then runs on the SMs the written mask allows under ``layout``."""

    def __init__(self, lib):
        self.lib, self.layout = lib, floorswept_layout()
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
        launch.fire(self.lib)
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
