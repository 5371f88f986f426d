"""Streams of our own for TPC lanes: created with cuStreamCreate in the primary context, and
:class:`MaskedStream`, a stream whose driver mask record we own.

Lane streams are never taken from torch's stream pool: pooled streams are handed out again to
other code, which would silently inherit a record mask.
"""

from __future__ import annotations

import contextlib
import warnings

from ...device import DeviceInfo, check, driver_module
from ...errors import InvalidSplitError, UnsupportedError
from .masks import TpcMask
from .mechanism import OFFSET_ENV
from .native import EMPTY_RECORD, NativeLib, RecordMismatchError, TpcNativeError


@contextlib.contextmanager
def primary_context(device_index: int):
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


def create_stream(device_index: int) -> tuple[int, object]:
    """(driver handle, torch ExternalStream) of a new non-blocking stream of our own.

    The stream keeps a reference to the primary context until :func:`destroy_stream`: if torch
    has not created its context yet, dropping the last reference would destroy the context and
    free the stream with it (seen on the H100: the record then held freed heap bytes).
    """
    import torch

    torch.cuda.init()
    drv = driver_module()
    dev = check(drv.cuDeviceGet(device_index), "cuDeviceGet")
    check(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")  # released in destroy_stream
    with primary_context(device_index):
        handle = check(drv.cuStreamCreate(int(drv.CUstream_flags.CU_STREAM_NON_BLOCKING)), "cuStreamCreate")
    return int(handle), torch.cuda.ExternalStream(int(handle), device=device_index)


def destroy_stream(device_index: int, handle: int) -> None:
    with primary_context(device_index) as drv:
        check(drv.cuStreamDestroy(drv.CUstream(handle)), "cuStreamDestroy")
    dev = check(drv.cuDeviceGet(device_index), "cuDeviceGet")
    check(drv.cuDevicePrimaryCtxRelease(dev), "cuDevicePrimaryCtxRelease")  # create_stream's reference


def format_record(record: list[int] | tuple[int, ...]) -> str:
    return "enabled={} mask={}".format(record[0], " ".join(f"{w:08x}" for w in record[1:]))


class MaskedStream:
    """A stream of our own whose mask record we own; ``close()`` restores and destroys it.

    Read before write: a new stream's record must read as a disabled record (all zero) before
    we write anything, and every later write goes through the library's compare-and-write,
    which refuses when the record no longer holds what we wrote last.
    """

    def __init__(self, lib: NativeLib, offset: int, device: DeviceInfo):
        self.lib, self.offset, self.device = lib, offset, device
        self.handle, self.stream = create_stream(device.index)
        try:
            found = lib.read_record(self.handle, offset)
        except TpcNativeError as exc:
            self.close_stream()
            raise UnsupportedError(
                f"cannot read the stream-mask record of a new stream at offset {offset:#x} on driver "
                f"{device.driver_api_version}: {exc}. Refusing to write; use backend='green'"
            ) from exc
        if tuple(found) != EMPTY_RECORD:
            self.close_stream()
            raise UnsupportedError(
                f"the stream-mask record of a new stream at offset {offset:#x} holds "
                f"{format_record(found)}, not an empty record: the offset is wrong for driver "
                f"{device.driver_api_version} ({device.kernel_driver or 'unknown kernel driver'}). "
                f"Refusing to write there; unset {OFFSET_ENV} or use backend='green'"
            )
        self.record = list(EMPTY_RECORD)  # what the record holds now

    def set(self, mask: TpcMask) -> None:
        """Restrict launches on this stream to the TPC bits of ``mask``."""
        if not mask:
            raise InvalidSplitError("an empty TPC mask leaves kernels no SM, so they would never finish")
        record = [1, *mask.disabled_words()]
        try:
            self.lib.replace_record(self.handle, self.offset, self.record, record)
        except RecordMismatchError as exc:
            raise UnsupportedError(
                f"the stream-mask record at offset {self.offset:#x} changed behind our back ({exc}): the "
                f"offset is wrong for driver {self.device.driver_api_version}; refusing to write"
            ) from exc
        self.record = record

    def close(self) -> None:
        """Restore the empty record (the driver may reuse the struct for a later stream), then
        destroy the stream."""
        if self.handle is None:
            return
        try:
            if tuple(self.record) != EMPTY_RECORD:
                self.lib.replace_record(self.handle, self.offset, self.record, list(EMPTY_RECORD))
                self.record = list(EMPTY_RECORD)
        except RecordMismatchError as exc:
            warnings.warn(f"not restoring a stream-mask record that changed behind our back: {exc}", RuntimeWarning)
        finally:
            self.close_stream()

    def close_stream(self) -> None:
        if self.handle is not None:
            destroy_stream(self.device.index, self.handle)
            self.handle = None
