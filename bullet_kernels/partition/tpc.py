"""TPC-mask backend: lanes restricted to chosen TPCs (2 SMs each) through our C library.

Mechanism and facts: tpc-masks.md and docs/tpc-masks-h100.md; the C side is csrc/tpc_mask.c
(loaded by tpc_native). Two mechanisms, chosen per driver (``BULLET_TPC_MECHANISM``):

* ``record``: each lane is a stream of our own whose private mask record (at the driver
  version's table offset) we set; the restriction travels with the stream, and graphs keep
  the mask they were captured with. Unknown or refuted versions are refused, never guessed;
  before the first write the record must look empty, and before every later write it must
  still hold what we wrote.
* ``hook``: our launch hook writes the mask into each launch descriptor. The callback cannot
  see which stream a launch goes to (the handle is not among its params on driver 580), so a
  lane's mask follows the *launching thread* inside ``PartitionSet.use`` / ``lane_scope``,
  graph replays included (the hook runs for every kernel of a replay). The descriptor's bits
  are physical TPC ids with floorswept gaps, so the bit -> SM map is probed, never assumed.

``auto`` (default) takes ``record`` where the table offset holds and ``hook`` elsewhere (on
driver 13000 the table offset was refuted on our H100). Either way every lane is verified
with the ``%smid`` probe before anyone gets it, and TPC masks can overlap, so each lane knows
its SMs up front (``Lane.expected_sms``).

Lane streams are created with cuStreamCreate, not taken from torch's stream pool: pooled
streams are handed out again to other code, which would silently inherit a record mask.
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
MECHANISM_ENV = "BULLET_TPC_MECHANISM"
MECHANISMS = ("auto", "record", "hook")

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


def choose_mechanism(lib: tpc_native.NativeLib, driver_api_version: int) -> tuple[str | None, str]:
    """``("record" | "hook", "")`` for this driver, or ``(None, why not)``."""
    want = os.environ.get(MECHANISM_ENV, "").strip().lower() or "auto"
    if want not in MECHANISMS:
        return None, f"{MECHANISM_ENV}={want!r} is not one of {', '.join(MECHANISMS)}"
    offset, why = stream_offset(lib, driver_api_version)
    if want == "record" and offset is None:
        return None, f"{MECHANISM_ENV}=record: {why}"
    if want == "auto":
        return ("record" if offset is not None else "hook"), ""
    return want, ""


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


class _ThreadMasks(threading.local):
    """The lane masks this thread is inside (innermost last), mirrored into the C library."""

    def __init__(self):
        self.stack: list[TpcMask] = []


class TpcBackend(Backend):
    name = "tpc"

    def __init__(self, device: DeviceInfo | None):
        super().__init__(device)
        self._maps: dict[str, TpcMap] = {}
        self._lock = threading.RLock()
        self._global: TpcMask | None = None
        self._thread = _ThreadMasks()

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
        return choose_mechanism(tpc_native.load(), device.driver_api_version)[1]

    def _require_device(self) -> DeviceInfo:
        reason = self.unavailable_reason(self.device)
        if reason:
            raise UnsupportedError(f"tpc backend unavailable: {reason}; try backend='green'")
        return self.device

    @property
    def mechanism(self) -> str:
        """``"record"`` (driver stream records) or ``"hook"`` (launch hook, thread-scoped)."""
        mech, why = choose_mechanism(tpc_native.load(), self._require_device().driver_api_version)
        if mech is None:
            raise UnsupportedError(f"tpc backend unavailable: {why}")
        return mech

    def _offset(self) -> int:
        offset, why = stream_offset(tpc_native.load(), self._require_device().driver_api_version)
        if offset is None:
            raise UnsupportedError(f"tpc backend unavailable: {why}")
        return offset

    def new_stream(self) -> MaskedStream:
        """An unmasked stream of our own whose record can be masked (record mechanism)."""
        return MaskedStream(tpc_native.load(), self._offset(), self._require_device())

    # -- the bit -> SM maps ------------------------------------------------------------------

    def tpc_map(self) -> TpcMap:
        """Which SMs each mask bit of the lane mechanism reaches (cached per GPU and driver)."""
        return self._map(self.mechanism)

    def descriptor_map(self) -> TpcMap:
        """The map of launch-descriptor bits (next-launch, thread and global masks)."""
        return self._map("hook")

    def _map(self, mechanism: str) -> TpcMap:
        with self._lock:
            if mechanism not in self._maps:
                self._maps[mechanism] = self._load_or_probe_map(mechanism)
            return self._maps[mechanism]

    def _load_or_probe_map(self, mechanism: str) -> TpcMap:
        d = self._require_device()
        # Record bits and descriptor bits differ (logical vs physical TPC ids on our H100).
        driver = f"{d.driver_api_version}/{d.kernel_driver or 'unknown'}/{mechanism}"
        tmap, _ = load_cached(d.uuid, driver, d.sm_count)
        if tmap is not None:
            return tmap
        tmap = self._probe_map(driver, mechanism)
        try:
            save_cached(tmap)
        except OSError as exc:  # a read-only home only costs a re-probe next time
            warnings.warn(f"could not cache the TPC map ({exc}); set BULLET_CACHE_DIR to a writable directory")
        return tmap

    def _probe_map(self, driver: str, mechanism: str) -> TpcMap:
        d = self.device
        if mechanism == "record":
            ms = self.new_stream()

            def observe(mask: TpcMask) -> frozenset[int]:
                ms.set(mask)
                return probe.observed_sms(ms.stream, d.sm_count, d.index, waves=2, spin_us=5)

            close = ms.close
        else:
            lib, (handle, _) = self._hook(), _create_stream(d.index)

            def observe(mask: TpcMask) -> frozenset[int]:
                return probe.observed_sms_next_launch(lib, handle, d.sm_count, mask.disabled_words(), d.index)

            def close() -> None:
                _destroy_stream(d.index, handle)

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
                    f"tpc backend ({mechanism}) could not map mask bits to SMs on driver "
                    f"{d.driver_api_version_str} ({d.kernel_driver or 'unknown'}): {exc}. Refusing to run; "
                    "try backend='green'"
                ) from exc
        finally:
            close()

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
        mechanism = self.mechanism
        granted, masks, tmap = self.grant(split), self.lane_masks(split), self.tpc_map()
        for name in split.names:
            if len(tmap.sms(masks[name])) != granted[name]:
                raise UnsupportedError(
                    f"lane {name!r}: TPCs {masks[name]} reach {len(tmap.sms(masks[name]))} SMs, not the "
                    f"{granted[name]} granted (this GPU has TPCs with a single SM); ask for other counts"
                )
        if mechanism == "record":

            def new_lane_stream(name: str):
                ms = self.new_stream()
                try:
                    ms.set(masks[name])
                except BaseException:
                    ms.close()
                    raise
                return ms.stream, ms.close

            scope = None
        else:
            lib = self._hook()
            for name in split.names:
                self._check_runs_somewhere(masks[name])

            def new_lane_stream(name: str):
                handle, stream = _create_stream(d.index)
                return stream, lambda: _destroy_stream(d.index, handle)

            def scope(name: str):
                return self._thread_scope(lib, masks[name])

        closers: list = []

        def release() -> None:  # the streams stay alive until here: lanes use them
            while closers:
                closers.pop()()

        def build() -> PartitionSet:
            lanes = {}
            for name in split.names:
                stream, close = new_lane_stream(name)
                closers.append(close)
                lanes[name] = Lane(name, split[name], granted[name], stream, expected_sms=tmap.sms(masks[name]),
                                   whole_gpu=granted[name] == d.sm_count)
            return PartitionSet(self.name, split, d, lanes, release, disjoint=not split.overlap, scope=scope)

        return verification.open_verified(build, release, verify)

    # -- launch hook ------------------------------------------------------------------------------

    def _hook(self) -> tpc_native.NativeLib:
        import torch

        self._require_device()
        torch.cuda.init()  # the callback table needs an initialised driver
        lib = tpc_native.load()
        if not tpc_native.hook_installed():
            warnings.warn(
                "bullet_kernels: installing the tpc launch hook; from now on this process cannot create "
                "green contexts (the driver refuses them while a launch callback is subscribed)",
                RuntimeWarning, stacklevel=3,
            )
        lib.hook_install()
        return lib

    def _check_runs_somewhere(self, mask: TpcMask) -> None:
        live = self.descriptor_map().live
        if not mask & live:
            raise InvalidSplitError(
                f"{mask!r} enables no live TPC, so a kernel launched with it would never finish; "
                f"live descriptor TPC bits: {live}"
            )

    def thread_mask(self, mask: TpcMask):
        """Inside the block, every kernel launched from this thread (graph replays included)
        runs on ``mask`` (descriptor bits) only. Nested blocks: the innermost wins."""
        self._check_runs_somewhere(mask)
        return self._thread_scope(self._hook(), mask)

    @contextlib.contextmanager
    def _thread_scope(self, lib: tpc_native.NativeLib, mask: TpcMask):
        """thread_mask without its checks: for lane scopes, whose masks open() already checked
        and verified (entered on every ``use(lane)``, so kept to the two library calls)."""
        stack = self._thread.stack
        stack.append(mask)
        lib.set_thread_mask(mask.disabled_words())
        try:
            yield
        finally:
            stack.pop()
            lib.set_thread_mask(stack[-1].disabled_words() if stack else None)

    @contextlib.contextmanager
    def next_launch_mask(self, mask: TpcMask):
        """The next kernel launched from this thread inside the block runs on ``mask`` only."""
        self._check_runs_somewhere(mask)
        lib = self._hook()
        lib.set_next_mask(mask.disabled_words())
        try:
            yield
        finally:
            lib.set_next_mask(None)  # never let an unconsumed mask leak past the block

    @contextlib.contextmanager
    def global_mask(self, mask: TpcMask):
        """Inside the block, launches that no lane, thread or record mask covers run on ``mask``."""
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
