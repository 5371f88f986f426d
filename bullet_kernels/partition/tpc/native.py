"""ctypes binding of ``libbullet_tpc.so`` (csrc/tpc_mask.c): finding it, loading it, calling it.

Search order: ``$BULLET_TPC_LIB`` (exactly that file), ``_native/`` next to every entry of
the package's ``__path__`` (a wheel install, and scikit-build-core's editable "redirect" mode,
which lists the CMake install tree there), ``bullet_kernels/_native/`` in site-packages, then
``build/`` of a source checkout (``cmake -S . -B build/<name>``). A copy built for another ABI
version is skipped, so a fresh ``build/`` wins over a stale installed copy.
"""

from __future__ import annotations

import ctypes
import functools
import os
import site
import sysconfig
from pathlib import Path

from ...errors import BulletError
from .. import hook_state

LIB_NAME = "libbullet_tpc.so"
ABI_VERSION = 3
BUILD_HINT = (
    "install with a C compiler present (pip install .) or build it with "
    "`cmake -S . -B build/tpc && cmake --build build/tpc`, or set BULLET_TPC_LIB to the .so"
)
# What a stream record holds before anyone masked it: enabled = 0 and no disabled TPC.
EMPTY_RECORD = (0, 0, 0, 0, 0)
E_STATE = -4  # BULLET_TPC_E_STATE: a record does not hold what the caller expected


class TpcNativeError(BulletError):
    """A libbullet_tpc call failed; the message is the library's own explanation."""


class RecordMismatchError(TpcNativeError):
    """A stream record did not hold what the caller expected, so nothing was written."""


class HookStats(ctypes.Structure):
    _fields_ = [
        ("calls", ctypes.c_uint64),
        ("writes", ctypes.c_uint64),
        ("skips", ctypes.c_uint64),
        ("last_params_size", ctypes.c_uint64),
        ("last_qmd_version", ctypes.c_uint32),
        ("installed", ctypes.c_uint32),
        ("thread_writes", ctypes.c_uint64),
    ]

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name, _ in self._fields_}


Words4 = ctypes.c_uint32 * 4
Words5 = ctypes.c_uint32 * 5


def candidates() -> list[Path]:
    """Where we look, in order (see the module docstring)."""
    env = os.environ.get("BULLET_TPC_LIB")
    if env:
        return [Path(env)]
    import bullet_kernels

    dirs = [Path(p) for p in getattr(bullet_kernels, "__path__", [])]
    sites = [*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["platlib"]]
    dirs += [Path(s) / "bullet_kernels" for s in sites]
    found = [d / "_native" / LIB_NAME for d in dirs]
    repo = Path(bullet_kernels.__file__).resolve().parent.parent
    builds = sorted(repo.glob(f"build/*/{LIB_NAME}"), key=lambda p: -p.stat().st_mtime)
    found += [repo / "build" / LIB_NAME, *builds]
    return list(dict.fromkeys(found))


class NativeLib:
    """One loaded copy of the library, with typed wrappers that raise TpcNativeError."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.cdll = lib = ctypes.CDLL(str(self.path))
        abi = lib.bullet_tpc_abi_version()
        if abi != ABI_VERSION:
            raise TpcNativeError(f"{self.path} has ABI version {abi}, this package needs {ABI_VERSION}; rebuild it")
        lib.bullet_tpc_last_error.restype = ctypes.c_char_p
        ptr, i32 = ctypes.c_void_p, ctypes.c_int
        lib.bullet_tpc_stream_mask_table.argtypes = [ptr, ptr, i32]
        lib.bullet_tpc_stream_record_address.argtypes = [ptr, i32, ctypes.POINTER(ctypes.c_void_p)]
        lib.bullet_tpc_read_stream_record.argtypes = [ptr, i32, ptr]
        lib.bullet_tpc_replace_stream_record.argtypes = [ptr, i32, ptr, ptr]
        lib.bullet_tpc_hook_enable.argtypes = [i32]
        lib.bullet_tpc_set_next_mask.argtypes = [ptr]
        lib.bullet_tpc_set_thread_mask.argtypes = [ptr]
        lib.bullet_tpc_hook_stats.argtypes = [ctypes.POINTER(HookStats)]
        lib.bullet_tpc_hook_callback.argtypes = [ptr, i32, i32, ptr]
        lib.bullet_tpc_hook_callback.restype = None
        lib.bullet_tpc_hook_reset_stats.restype = None

    def check(self, rc: int, what: str) -> None:
        """Raise with the library's own message where ``rc`` is an error code."""
        if rc != 0:
            msg = (self.cdll.bullet_tpc_last_error() or b"").decode(errors="replace")
            error = RecordMismatchError if rc == E_STATE else TpcNativeError
            raise error(f"{what} failed (code {rc}): {msg}")

    # -- per-stream mask record: *(void**)handle + offset --
    def stream_mask_offset(self, driver_api_version: int) -> int | None:
        off = self.cdll.bullet_tpc_stream_mask_offset(int(driver_api_version))
        return None if off < 0 else off

    def known_offsets(self) -> dict[int, int]:
        n = self.cdll.bullet_tpc_stream_mask_table(None, None, 0)
        versions, offsets = (ctypes.c_int * n)(), (ctypes.c_int * n)()
        self.cdll.bullet_tpc_stream_mask_table(versions, offsets, n)
        return dict(zip(versions, offsets))

    def record_address(self, stream: int, offset: int) -> int:
        """Where the record of ``stream`` is: the pointer in the handle's first word + offset."""
        out = ctypes.c_void_p()
        self.check(self.cdll.bullet_tpc_stream_record_address(stream, offset, ctypes.byref(out)), "locating the stream record")
        return int(out.value)

    def read_record(self, stream: int, offset: int) -> list[int]:
        """``[enabled, disabled word 0..3]`` as found in the record of ``stream``."""
        out = Words5()
        self.check(self.cdll.bullet_tpc_read_stream_record(stream, offset, out), "reading the stream record")
        return list(out)

    def replace_record(self, stream: int, offset: int, expected: list[int], record: list[int]) -> None:
        """Write ``record`` only where the record still holds ``expected`` (else RecordMismatchError)."""
        rc = self.cdll.bullet_tpc_replace_stream_record(stream, offset, Words5(*expected), Words5(*record))
        self.check(rc, "writing the stream record")

    # -- launch hook --
    def hook_install(self) -> None:
        self.check(self.cdll.bullet_tpc_hook_install(), "installing the launch hook")
        hook_state.mark_hook_installed()

    def hook_enable(self, on: bool) -> None:
        """Turn the installed callback off or on again (the subscription stays)."""
        self.check(self.cdll.bullet_tpc_hook_enable(int(bool(on))), "switching the launch hook")

    def set_next_mask(self, disabled: list[int] | None) -> None:
        self.check(self.cdll.bullet_tpc_set_next_mask(None if disabled is None else Words4(*disabled)), "next-launch mask")

    def set_thread_mask(self, disabled: list[int] | None) -> None:
        self.check(self.cdll.bullet_tpc_set_thread_mask(None if disabled is None else Words4(*disabled)), "thread mask")

    def hook_stats(self) -> dict:
        stats = HookStats()
        self.check(self.cdll.bullet_tpc_hook_stats(ctypes.byref(stats)), "reading hook stats")
        return stats.as_dict()

    def hook_reset_stats(self) -> None:
        self.cdll.bullet_tpc_hook_reset_stats()

    def hook_callback(self, domain: int, cbid: int, params: int | None) -> None:
        """Call the launch callback directly (tests feed it fake descriptors)."""
        self.cdll.bullet_tpc_hook_callback(None, domain, cbid, params)


@functools.lru_cache(maxsize=1)
def find_library() -> tuple[NativeLib | None, str]:
    """``(library, "")`` for the first candidate that loads, else ``(None, why not)``. Cached;
    ``find_library.cache_clear()`` looks again."""
    tried = candidates()
    refused = []
    for path in tried:
        if path.is_file():
            try:
                return NativeLib(path), ""
            except (OSError, TpcNativeError) as exc:
                refused.append(f"{path} cannot be loaded ({exc})")
    if refused:
        return None, f"native library unusable: {'; '.join(refused)}; {BUILD_HINT}"
    where = "BULLET_TPC_LIB=" + str(tried[0]) if os.environ.get("BULLET_TPC_LIB") else ", ".join(map(str, tried[:3])) + ", ..."
    return None, f"native library not built: {LIB_NAME} not found (looked at {where}); {BUILD_HINT}"


def unavailable_reason() -> str:
    return find_library()[1]


def load() -> NativeLib:
    lib, why = find_library()
    if lib is None:
        raise TpcNativeError(why)
    return lib
