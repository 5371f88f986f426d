"""Which TPC-mask mechanism this driver gets, and where the stream record is (no GPU needed).

* ``record``: the driver's own per-stream mask record, at ``*(void**)handle + offset`` where the
  offset depends on the driver API version (csrc table). Masks follow the stream: any thread,
  eager launches and graph captures alike, and no launch callback is subscribed, so green
  contexts stay usable in the same process. Bits number logical TPCs.
* ``hook``: our launch callback writes each kernel's descriptor. It cannot see the stream, so
  lanes follow the launching thread inside ``PartitionSet.use`` / ``lane_scope``; bits number
  physical TPCs; once installed, the driver refuses new green contexts in the process.

``auto`` (default, ``BULLET_TPC_MECHANISM``) prefers the record wherever an offset is known and
falls back to the hook elsewhere (and where the record does not verify: see TpcBackend).
Unknown versions are refused, never guessed; ``BULLET_TPC_STREAM_OFFSET`` overrides the offset
for experts, still subject to the read-before-write check and the probe.
"""

from __future__ import annotations

import dataclasses
import os

from .native import NativeLib

OFFSET_ENV = "BULLET_TPC_STREAM_OFFSET"
MECHANISM_ENV = "BULLET_TPC_MECHANISM"
MECHANISMS = ("auto", "record", "hook")

# Table offsets our own measurements refuted: never written without the expert override.
# Empty since 13000 (0x51c) was reinstated: it had been refuted on the H100 because masks were
# written at handle + 0x51c, but the record sits one pointer further, at *(void**)handle + 0x51c,
# and there a probe on an H200 (driver 580.159.04) ran on exactly the enabled TPCs' SMs.
REFUTED_OFFSETS: dict[int, str] = {}


@dataclasses.dataclass(frozen=True)
class Choice:
    """The mechanism for one driver: ``mechanism`` is None when the request is refused."""

    mechanism: str | None
    requested: str  # what BULLET_TPC_MECHANISM asked for: auto, record or hook
    offset: int | None = None  # the record offset, where one is usable
    why: str = ""  # why refused, or (auto -> hook) why the record is not used

    @property
    def may_fall_back(self) -> bool:
        """auto chose the record: if it does not verify, the hook may take over."""
        return self.requested == "auto" and self.mechanism == "record"


def stream_offset(lib: NativeLib, driver_api_version: int) -> tuple[int | None, str]:
    """``(offset, "")`` of the record in the driver's stream struct, or ``(None, why not)``."""
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


def choose(lib: NativeLib, driver_api_version: int) -> Choice:
    """The mechanism ``BULLET_TPC_MECHANISM`` (default auto) gets on this driver."""
    want = os.environ.get(MECHANISM_ENV, "").strip().lower() or "auto"
    if want not in MECHANISMS:
        return Choice(None, want, why=f"{MECHANISM_ENV}={want!r} is not one of {', '.join(MECHANISMS)}")
    offset, why = stream_offset(lib, driver_api_version)
    if want == "hook":
        return Choice("hook", want)
    if offset is None:
        if want == "record":
            return Choice(None, want, why=f"{MECHANISM_ENV}=record: {why}")
        return Choice("hook", want, why=why)
    return Choice("record", want, offset)


def describe(mechanism: str, offset: int | None = None) -> str:
    """One line naming the mechanism, for ``bullet info``."""
    if mechanism == "record":
        return f"stream record at *(CUstream)+{offset:#x} (logical TPC bits)"
    return "launch hook (physical descriptor bits, thread-scoped lanes)"
