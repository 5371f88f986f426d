"""TPC-mask backend: each lane is a driver stream whose private TPC mask record we set.

Mechanism and facts: tpc-masks.md; the C side is csrc/tpc_mask.c (loaded by tpc_native).
Unlike green contexts, TPC masks can overlap and are placed by us, so each lane knows its SMs
up front (``Lane.expected_sms``) and the probe checks them. Safety rules:

* the stream-mask offset comes from the driver-version table (or the expert override
  ``BULLET_TPC_STREAM_OFFSET``); unknown versions are refused, never guessed;
* before the first write the record must look empty, and before every later write it must
  still hold what we wrote (else the offset is wrong and we would corrupt driver memory);
* every lane is verified with the ``%smid`` probe before anyone gets it.

Lane streams are created with cuStreamCreate, not taken from torch's stream pool: pooled
streams are handed out again to other code, which would silently inherit our mask.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

from ..device import DeviceInfo, check, driver_module
from ..errors import InvalidSplitError, PartitionVerificationError, UnsupportedError
from . import probe, tpc_native, verification
from .base import Backend, Lane, PartitionSet
from .config import SMSplit, grant_tpc
from .tpc_mask import TpcMap, TpcMapError, TpcMask, load_cached, place_lanes, probe_map, save_cached

OFFSET_ENV = "BULLET_TPC_STREAM_OFFSET"

# Table offsets our own measurements refuted: never written without the expert override.
REFUTED_OFFSETS = {
    13000: (
        "on an H100 with driver 580.159.04 (2026-11-25, bench/results/tpc-diagnose-h100-20261125.json) "
        "a mask written at 0x51c restricted nothing (the probe ran on all 132 SMs) and streams from "
        "cuStreamCreate hold other data there, so 0x51c is not the mask record of this driver's streams"
    ),
}


def stream_offset(lib: tpc_native.NativeLib, driver_api_version: int) -> tuple[int | None, str]:
    """``(offset, "")`` for this driver, or ``(None, why not)``."""
    override = os.environ.get(OFFSET_ENV, "").strip()
    if override:
        try:
            offset = int(override, 0)
        except ValueError:
            return None, f"{OFFSET_ENV}={override!r} is not a byte offset; write it like 0x51c"
        if offset < 0 or offset % 4:
            return None, f"{OFFSET_ENV}={override!r} must be a non-negative multiple of 4"
        return offset, ""
    offset = lib.stream_mask_offset(driver_api_version)
    if offset is not None and driver_api_version in REFUTED_OFFSETS:
        return None, (
            f"the stream-mask offset {offset:#x} of driver API version {driver_api_version} is refuted: "
            f"{REFUTED_OFFSETS[driver_api_version]}; set {OFFSET_ENV} to try another offset (still verified)"
        )
    if offset is None:
        known = ", ".join(str(v) for v in lib.known_offsets())
        return None, (
            f"driver API version {driver_api_version} has no known stream-mask offset; known: {known}; "
            f"set {OFFSET_ENV} to override at your own risk (still verified)"
        )
    return offset, ""


@contextlib.contextmanager
def _primary_context(device_index: int):
    """Make the device's primary context (the one torch uses) current for raw driver calls."""
    drv = driver_module()
    dev = check(drv.cuDeviceGet(device_index), "cuDeviceGet")
    ctx = check(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    check(drv.cuCtxPushCurrent(ctx), "cuCtxPushCurrent")
    try:
        yield drv
    finally:
        check(drv.cuCtxPopCurrent(), "cuCtxPopCurrent")
        check(drv.cuDevicePrimaryCtxRelease(dev), "cuDevicePrimaryCtxRelease")


def _create_stream(device_index: int) -> tuple[int, object]:
    """(driver handle, torch ExternalStream) of a new non-blocking stream of our own.

    The stream lives in the primary context, so it keeps a reference to that context until
    _destroy_stream: if torch has not created its context yet, dropping the last reference
    would destroy the context and free the stream with it (seen on the H100: the stream's
    mask record then held freed heap bytes and masks written there restricted nothing).
    """
    import torch

    torch.cuda.init()
    drv = driver_module()
    dev = check(drv.cuDeviceGet(device_index), "cuDeviceGet")
    check(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")  # released in _destroy_stream
    with _primary_context(device_index):
        handle = check(drv.cuStreamCreate(int(drv.CUstream_flags.CU_STREAM_NON_BLOCKING)), "cuStreamCreate")
    return int(handle), torch.cuda.ExternalStream(int(handle), device=device_index)


def _destroy_stream(device_index: int, handle: int) -> None:
    with _primary_context(device_index) as drv:
        check(drv.cuStreamDestroy(drv.CUstream(handle)), "cuStreamDestroy")
    dev = check(drv.cuDeviceGet(device_index), "cuDeviceGet")
    check(drv.cuDevicePrimaryCtxRelease(dev), "cuDevicePrimaryCtxRelease")  # _create_stream's reference


def _fmt(record: list[int]) -> str:
    return "enabled={} mask={}".format(record[0], " ".join(f"{w:08x}" for w in record[1:]))


class MaskedStream:
    """A stream of our own whose mask record we own; ``close()`` restores and destroys it."""

    def __init__(self, lib: tpc_native.NativeLib, offset: int, device: DeviceInfo):
        self.lib, self.offset, self.device = lib, offset, device
        self.handle, self.stream = _create_stream(device.index)
        self._original = lib.read_record(self.handle, offset)
        self._written: list[int] | None = None
        if self._original != [0, 0, 0, 0, 0]:
            self._destroy()
            raise UnsupportedError(
                f"the stream-mask record of a new stream at offset {offset:#x} holds "
                f"{_fmt(self._original)}, not an empty record: the offset is wrong for driver "
                f"{device.driver_api_version} ({device.kernel_driver or 'unknown kernel driver'}). "
                f"Refusing to write there; unset {OFFSET_ENV} or use backend='green'"
            )

    def set(self, mask: TpcMask) -> None:
        if not mask:
            raise InvalidSplitError("an empty TPC mask leaves kernels no SM, so they would never finish")
        expected = self._original if self._written is None else [1, *self._written]
        found = self.lib.read_record(self.handle, self.offset)
        if found != expected:
            raise UnsupportedError(
                f"the stream-mask record at offset {self.offset:#x} changed behind our back "
                f"(expected {_fmt(expected)}, found {_fmt(found)}): the offset is wrong for driver "
                f"{self.device.driver_api_version}; refusing to write"
            )
        words = mask.disabled_words()
        self.lib.set_stream_mask(self.handle, self.offset, words)
        self._written = words

    def close(self) -> None:
        if self._written is not None:
            self.lib.write_record(self.handle, self.offset, self._original)
            self._written = None
        self._destroy()

    def _destroy(self) -> None:
        if self.handle is not None:
            _destroy_stream(self.device.index, self.handle)
            self.handle = None


class TpcBackend(Backend):
    name = "tpc"

    def __init__(self, device: DeviceInfo | None):
        super().__init__(device)
        self._map: TpcMap | None = None
        self._lock = threading.RLock()
        self._global: TpcMask | None = None

    @classmethod
    def unavailable_reason(cls, device: DeviceInfo | None) -> str:
        if device is None:
            return "no GPU"
        if device.compute_capability < (7, 0):
            cc = ".".join(map(str, device.compute_capability))
            return f"compute capability {cc} < 7.0: TPC masks need Volta or later"
        why = tpc_native.unavailable_reason()
        if why:
            return why
        return stream_offset(tpc_native.load(), device.driver_api_version)[1]

    def _require_device(self) -> DeviceInfo:
        reason = self.unavailable_reason(self.device)
        if reason:
            raise UnsupportedError(f"tpc backend unavailable: {reason}; try backend='green'")
        return self.device

    def _offset(self) -> int:
        offset, why = stream_offset(tpc_native.load(), self._require_device().driver_api_version)
        if offset is None:
            raise UnsupportedError(f"tpc backend unavailable: {why}")
        return offset

    def new_stream(self) -> MaskedStream:
        """An unmasked stream of our own that can be masked (tests and experiments)."""
        return MaskedStream(tpc_native.load(), self._offset(), self._require_device())

    # -- the bit -> SM map -------------------------------------------------------------------

    def tpc_map(self) -> TpcMap:
        """Which SMs each mask bit reaches: from the cache, else probed once and cached."""
        with self._lock:
            if self._map is None:
                self._map = self._load_or_probe_map()
            return self._map

    def _load_or_probe_map(self) -> TpcMap:
        d = self._require_device()
        driver = f"{d.driver_api_version}/{d.kernel_driver or 'unknown'}"
        tmap, _ = load_cached(d.uuid, driver, d.sm_count)
        if tmap is not None:
            return tmap
        tmap = self._probe_map(driver)
        try:
            save_cached(tmap)
        except OSError as exc:  # a read-only home only costs a re-probe next time
            warnings.warn(f"could not cache the TPC map ({exc}); set BULLET_CACHE_DIR to a writable directory")
        return tmap

    def _probe_map(self, driver: str) -> TpcMap:
        d = self.device
        ms = self.new_stream()

        def observe(mask: TpcMask) -> frozenset[int]:
            ms.set(mask)
            return probe.observed_sms(ms.stream, d.sm_count, d.index, waves=2, spin_us=5)

        def build() -> TpcMap:
            return probe_map(observe, d.sm_count, uuid=d.uuid, driver=driver)

        try:
            try:
                return build()
            except TpcMapError:
                pass  # other work on the GPU can hide SMs from one probe: try once more
            try:
                return build()
            except TpcMapError as exc:
                raise PartitionVerificationError(
                    f"tpc backend could not map mask bits to SMs on driver {d.driver_api_version_str} "
                    f"({d.kernel_driver or 'unknown'}): {exc}. Refusing to run; try backend='green'"
                ) from exc
        finally:
            ms.close()

    # -- partitions ------------------------------------------------------------------------------

    def grant(self, split: SMSplit) -> dict[str, int]:
        return grant_tpc(split, self._require_device().sm_count)

    def lane_masks(self, split: SMSplit) -> dict[str, TpcMask]:
        """The enabled TPC bits of each lane of ``split``."""
        tmap = self.tpc_map()
        places = place_lanes(self.grant(split), tmap.tpc_count, split.overlap)
        return {name: tmap.mask_for(places[name]) for name in split.names}

    def open(self, split: SMSplit, verify: bool = True) -> PartitionSet:
        d = self._require_device()
        granted, masks, tmap = self.grant(split), self.lane_masks(split), self.tpc_map()
        streams: list[MaskedStream] = []

        def release() -> None:  # the streams stay alive until here: lanes use them
            while streams:
                streams.pop().close()

        try:
            lanes = {}
            for name in split.names:
                expected = tmap.sms(masks[name])
                if len(expected) != granted[name]:
                    raise UnsupportedError(
                        f"lane {name!r}: TPCs {masks[name]} reach {len(expected)} SMs, not the "
                        f"{granted[name]} granted (this GPU has TPCs with a single SM); ask for other counts"
                    )
                streams.append(self.new_stream())
                streams[-1].set(masks[name])
                lanes[name] = Lane(name, split[name], granted[name], streams[-1].stream, expected_sms=expected,
                                   whole_gpu=granted[name] == d.sm_count)
            pset = PartitionSet(self.name, split, d, lanes, release, disjoint=not split.overlap)
            if verify:
                verification.probe_and_check(pset)
            return pset
        except BaseException:
            release()
            raise


    # -- launch hook (experiments; graph replays ignore it, see tpc-masks.md) ---------------------

    def _hook(self) -> tpc_native.NativeLib:
        import torch

        self._require_device()
        torch.cuda.init()  # the callback table needs an initialised driver
        lib = tpc_native.load()
        lib.hook_install()
        return lib

    def _check_runs_somewhere(self, mask: TpcMask) -> None:
        live = self.tpc_map().live
        if not mask & live:
            raise InvalidSplitError(
                f"{mask!r} enables no live TPC, so a kernel launched with it would never finish; "
                f"live TPC bits: {live}"
            )

    @contextlib.contextmanager
    def next_launch_mask(self, mask: TpcMask):
        """The next kernel launched from this thread inside the block runs on ``mask`` only."""
        self._check_runs_somewhere(mask)
        lib = self._hook()
        lib.set_next_mask(mask.disabled_words())
        try:
            yield
        finally:
            lib.set_next_mask(None)  # graph replays do not consume it: never let it leak

    @contextlib.contextmanager
    def global_mask(self, mask: TpcMask):
        """Inside the block, launches on streams without a stream mask run on ``mask`` only."""
        self._check_runs_somewhere(mask)
        lib = self._hook()
        with self._lock:
            previous, self._global = self._global, mask
            lib.set_global_mask(mask.disabled_words())
        try:
            yield
        finally:
            with self._lock:
                self._global = previous
                lib.set_global_mask(None if previous is None else previous.disabled_words())

    def hook_stats(self) -> dict:
        return tpc_native.load().hook_stats()
