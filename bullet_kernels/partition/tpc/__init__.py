"""TPC-mask backend: lanes restricted to chosen TPCs (2 SMs each) through our C library.

Facts in docs/tpc-masks.md; the C side is csrc/tpc_mask.c (bound in :mod:`.native`). The
mechanism is chosen per driver (:mod:`.mechanism`): the driver's per-stream ``record``
wherever its offset is known, else our launch ``hook``. In ``auto`` mode a record that does not
verify (its bit map cannot be probed) falls back to the hook with a warning. Either way every
lane is verified with the ``%smid`` probe before anyone gets it, and TPC masks can overlap, so
each lane knows its SMs up front (``Lane.expected_sms``).

Record lanes are streams of our own (:mod:`.streams`) whose record holds the lane's mask: the
restriction travels with the stream, for any thread, and graphs captured on it keep it. Hook
lanes restrict the launching thread inside ``PartitionSet.use`` / ``lane_scope``.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

from ...device import DeviceInfo
from ...errors import BulletError, PartitionVerificationError, UnsupportedError
from .. import hook_state, probe, verification
from ..base import Backend, Lane, PartitionSet
from ..config import SMSplit, grant_tpc
from . import mechanism as mechanisms
from . import native, streams
from .masks import TpcMap, TpcMapError, TpcMask, load_cached, place_lanes, probe_map, save_cached
from .streams import MaskedStream

MECHANISM_NAMES = ("record", "hook")


class _ThreadMasks(threading.local):
    """The hook lane masks this thread is inside (innermost last), mirrored into the C library."""

    def __init__(self):
        self.stack: list[TpcMask] = []


class TpcBackend(Backend):
    name = "tpc"

    def __init__(self, device: DeviceInfo | None):
        super().__init__(device)
        self._maps: dict[str, TpcMap] = {}
        self._mechanism: str | None = None
        self._lock = threading.RLock()
        self._thread = _ThreadMasks()

    @classmethod
    def unavailable_reason(cls, device: DeviceInfo | None) -> str:
        if device is None:
            return "no GPU"
        if device.compute_capability < (7, 0):
            cc = ".".join(map(str, device.compute_capability))
            return f"compute capability {cc} < 7.0: TPC masks need Volta or later"
        why = native.unavailable_reason()
        if why:
            return why
        choice = mechanisms.choose(native.load(), device.driver_api_version)
        return choice.why if choice.mechanism is None else ""

    def _require_device(self) -> DeviceInfo:
        reason = self.unavailable_reason(self.device)
        if reason:
            raise UnsupportedError(f"tpc backend unavailable: {reason}; try backend='green'")
        return self.device

    def _choice(self) -> mechanisms.Choice:
        choice = mechanisms.choose(native.load(), self._require_device().driver_api_version)
        if choice.mechanism is None:
            raise UnsupportedError(f"tpc backend unavailable: {choice.why}")
        return choice

    # -- mechanism ---------------------------------------------------------------------------------

    @property
    def mechanism(self) -> str:
        """``"record"`` (driver stream records) or ``"hook"`` (launch hook, thread-scoped).

        Decided once per backend. Where ``auto`` picked the record, its bit map is probed (or
        read from the cache) first: a record whose masks do not hold falls back to the hook.
        """
        with self._lock:
            if self._mechanism is None:
                self._mechanism = self._verified_mechanism()
            return self._mechanism

    def _verified_mechanism(self) -> str:
        choice = self._choice()
        if choice.may_fall_back:
            try:
                self.tpc_map("record")
            except (UnsupportedError, PartitionVerificationError) as exc:
                warnings.warn(
                    f"tpc backend: the stream record did not verify on driver {self.device.driver_api_version} "
                    f"({exc}); falling back to the launch hook", RuntimeWarning, stacklevel=3,
                )
                return "hook"
        return choice.mechanism

    def describe(self) -> str:
        if self.unavailable_reason(self.device):
            return ""
        try:
            mech = self.mechanism
            return mechanisms.describe(mech, self._choice().offset if mech == "record" else None)
        except BulletError as exc:
            return f"no usable mechanism: {exc}"

    def _offset(self) -> int:
        choice = self._choice()
        if choice.offset is None:
            raise UnsupportedError(f"tpc backend: no stream record on this driver: {choice.why}")
        return choice.offset

    def new_stream(self) -> MaskedStream:
        """An unmasked stream of our own whose record can be masked (record mechanism)."""
        return MaskedStream(native.load(), self._offset(), self._require_device())

    def install_hook(self) -> native.NativeLib:
        """Subscribe the launch hook (once per process; it cannot be undone). From then on the
        driver refuses to create green contexts in this process."""
        import torch

        self._require_device()
        torch.cuda.init()  # the callback table needs an initialised driver
        lib = native.load()
        if not hook_state.hook_installed():
            warnings.warn(
                "bullet_kernels: installing the tpc launch hook; from now on this process cannot create "
                "green contexts (the driver refuses them while a launch callback is subscribed)",
                RuntimeWarning, stacklevel=3,
            )
        lib.hook_install()
        return lib

    # -- the bit -> SM maps ------------------------------------------------------------------

    def tpc_map(self, mechanism: str | None = None) -> TpcMap:
        """Which SMs each mask bit of ``mechanism`` (default: the lanes' one) reaches; probed
        once per GPU, driver and mechanism, then cached on disk."""
        mech = mechanism or self.mechanism
        if mech not in MECHANISM_NAMES:
            raise ValueError(f"mechanism {mech!r}: allowed {', '.join(MECHANISM_NAMES)}")
        with self._lock:
            if mech not in self._maps:
                self._maps[mech] = self._load_or_probe_map(mech)
            return self._maps[mech]

    def _load_or_probe_map(self, mechanism: str) -> TpcMap:
        d = self._require_device()
        # Record bits and descriptor bits number TPCs differently (logical vs physical), and a
        # record map only holds for the offset it was probed at.
        where = f"record@{self._offset():#x}" if mechanism == "record" else mechanism
        driver = f"{d.driver_api_version}/{d.kernel_driver or 'unknown'}/{where}"
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
            lib, (handle, _) = self.install_hook(), streams.create_stream(d.index)

            def observe(mask: TpcMask) -> frozenset[int]:
                return probe.observed_sms_next_launch(lib, handle, d.sm_count, mask.disabled_words(), d.index)

            def close() -> None:
                streams.destroy_stream(d.index, handle)

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
        """The enabled TPC bits of each lane of ``split`` (live bits of the lanes' map only)."""
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
            lib = self.install_hook()

            def new_lane_stream(name: str):
                handle, stream = streams.create_stream(d.index)
                return stream, lambda: streams.destroy_stream(d.index, handle)

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

    @contextlib.contextmanager
    def _thread_scope(self, lib: native.NativeLib, mask: TpcMask):
        """Hook lanes: kernels launched from this thread inside the block run on ``mask``
        (nested scopes: the innermost wins). Entered on every ``use(lane)``, so kept to the two
        library calls: open() placed and verified the mask."""
        stack = self._thread.stack
        stack.append(mask)
        lib.set_thread_mask(mask.disabled_words())
        try:
            yield
        finally:
            stack.pop()
            lib.set_thread_mask(stack[-1].disabled_words() if stack else None)


__all__ = ["MaskedStream", "TpcBackend", "TpcMap", "TpcMask"]
