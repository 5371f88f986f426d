"""ctypes binding of ``libbullet_tpc.so`` (csrc/tpc_mask.c): finding it, loading it, calling it.

Search order: ``$BULLET_TPC_LIB`` (exactly that file), ``_native/`` next to every entry of
the package's ``__path__`` (a wheel install, and scikit-build-core's editable "redirect" mode,
which lists the CMake install tree there), ``bullet_kernels/_native/`` in site-packages, then
``build/`` of a source checkout (``cmake -S . -B build/<name>``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import site
import sysconfig
from pathlib import Path

from ..errors import BulletError

LIB_NAME = "libbullet_tpc.so"
ABI_VERSION = 2
BUILD_HINT = (
    "install with a C compiler present (pip install .) or build it with "
    "`cmake -S . -B build/tpc && cmake --build build/tpc`, or set BULLET_TPC_LIB to the .so"
)


class TpcNativeError(BulletError):
    """A libbullet_tpc call failed; the message is the library's own explanation."""


class HookStats(ctypes.Structure):
    _fields_ = [
        ("calls", ctypes.c_uint64),
        ("writes", ctypes.c_uint64),
        ("skips", ctypes.c_uint64),
        ("last_params_size", ctypes.c_uint64),
        ("last_qmd_version", ctypes.c_uint32),
        ("installed", ctypes.c_uint32),
        ("stream_writes", ctypes.c_uint64),
        ("thread_writes", ctypes.c_uint64),
    ]

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name, _ in self._fields_}


TRACE_WORDS = 16
TRACE_DEREF = 64
TRACE_MAX = 64


class TraceRecord(ctypes.Structure):
    _fields_ = [
        ("domain", ctypes.c_int32),
        ("cbid", ctypes.c_int32),
        ("size", ctypes.c_uint32),
        ("n_words", ctypes.c_uint32),
        ("words", ctypes.c_uint64 * TRACE_WORDS),
        ("deref", (ctypes.c_uint64 * TRACE_DEREF) * TRACE_WORDS),
        ("ok", ctypes.c_uint8 * TRACE_WORDS),
    ]

    def as_dict(self) -> dict:
        n = self.n_words
        return {"domain": self.domain, "cbid": self.cbid, "size": self.size, "words": list(self.words[:n]),
                "deref": {i: list(self.deref[i]) for i in range(n) if self.ok[i]}}


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


_hook_installed = False


def hook_installed() -> bool:
    """Whether this process installed the launch hook (it cannot be removed again)."""
    return _hook_installed


class NativeLib:
    """One loaded copy of the library, with typed wrappers that raise TpcNativeError."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lib = lib = ctypes.CDLL(str(self.path))
        abi = lib.bullet_tpc_abi_version()
        if abi != ABI_VERSION:
            raise TpcNativeError(f"{self.path} has ABI version {abi}, this package needs {ABI_VERSION}; rebuild it")
        lib.bullet_tpc_last_error.restype = ctypes.c_char_p
        ptr, i32 = ctypes.c_void_p, ctypes.c_int
        for name in ("read_stream_mask", "set_stream_mask", "write_stream_record"):
            getattr(lib, f"bullet_tpc_{name}").argtypes = [ptr, i32, ptr]
        lib.bullet_tpc_clear_stream_mask.argtypes = [ptr, i32]
        lib.bullet_tpc_set_global_mask.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.bullet_tpc_set_next_mask.argtypes = [ctypes.c_void_p]
        lib.bullet_tpc_set_thread_mask.argtypes = [ctypes.c_void_p]
        lib.bullet_tpc_hook_enable.argtypes = [ctypes.c_int]
        lib.bullet_tpc_hook_set_stream_word.argtypes = [ctypes.c_int]
        lib.bullet_tpc_hook_set_stream_mask.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.bullet_tpc_hook_trace_start.argtypes = [ctypes.c_int]
        lib.bullet_tpc_hook_trace_read.argtypes = [ctypes.POINTER(TraceRecord), ctypes.c_int]
        lib.bullet_tpc_peek.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
        lib.bullet_tpc_hook_stats.argtypes = [ctypes.POINTER(HookStats)]
        lib.bullet_tpc_hook_callback.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        lib.bullet_tpc_hook_callback.restype = None
        lib.bullet_tpc_hook_reset_stats.restype = None
        lib.bullet_tpc_stream_mask_table.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = (self._lib.bullet_tpc_last_error() or b"").decode(errors="replace")
            raise TpcNativeError(f"{what} failed (code {rc}): {msg}")

    # -- per-stream mask record --
    def stream_mask_offset(self, driver_api_version: int) -> int | None:
        off = self._lib.bullet_tpc_stream_mask_offset(int(driver_api_version))
        return None if off < 0 else off

    def known_offsets(self) -> dict[int, int]:
        n = self._lib.bullet_tpc_stream_mask_table(None, None, 0)
        versions, offsets = (ctypes.c_int * n)(), (ctypes.c_int * n)()
        self._lib.bullet_tpc_stream_mask_table(versions, offsets, n)
        return dict(zip(versions, offsets))

    def read_record(self, stream: int, offset: int) -> list[int]:
        out = Words5()
        self._check(self._lib.bullet_tpc_read_stream_mask(stream, offset, out), "reading the stream mask")
        return list(out)

    def set_stream_mask(self, stream: int, offset: int, disabled: list[int]) -> None:
        self._check(self._lib.bullet_tpc_set_stream_mask(stream, offset, Words4(*disabled)), "setting the stream mask")

    def write_record(self, stream: int, offset: int, record: list[int]) -> None:
        self._check(self._lib.bullet_tpc_write_stream_record(stream, offset, Words5(*record)), "writing the stream mask")

    def clear_stream_mask(self, stream: int, offset: int) -> None:
        self._check(self._lib.bullet_tpc_clear_stream_mask(stream, offset), "clearing the stream mask")

    # -- launch hook --
    def hook_install(self) -> None:
        global _hook_installed
        self._check(self._lib.bullet_tpc_hook_install(), "installing the launch hook")
        _hook_installed = True

    def hook_enable(self, on: bool) -> None:
        """Turn the installed callback off or on again (the subscription stays)."""
        self._check(self._lib.bullet_tpc_hook_enable(int(bool(on))), "switching the launch hook")

    def set_next_mask(self, disabled: list[int] | None) -> None:
        self._check(self._lib.bullet_tpc_set_next_mask(None if disabled is None else Words4(*disabled)), "next-launch mask")

    def set_global_mask(self, disabled: list[int] | None) -> None:
        words = None if disabled is None else Words4(*disabled)
        self._check(self._lib.bullet_tpc_set_global_mask(words, int(disabled is not None)), "global mask")

    def set_thread_mask(self, disabled: list[int] | None) -> None:
        self._check(self._lib.bullet_tpc_set_thread_mask(None if disabled is None else Words4(*disabled)), "thread mask")

    def set_stream_word(self, word: int) -> None:
        self._check(self._lib.bullet_tpc_hook_set_stream_word(int(word)), "setting the hook's stream word")

    def stream_word(self) -> int:
        return self._lib.bullet_tpc_hook_stream_word()

    def set_hook_stream_mask(self, stream: int, disabled: list[int] | None) -> None:
        words = None if disabled is None else Words4(*disabled)
        self._check(self._lib.bullet_tpc_hook_set_stream_mask(stream, words), "hook stream mask")

    def trace_start(self, count: int) -> None:
        self._check(self._lib.bullet_tpc_hook_trace_start(int(count)), "starting the hook trace")

    def trace_read(self) -> list[dict]:
        out = (TraceRecord * TRACE_MAX)()
        n = self._lib.bullet_tpc_hook_trace_read(out, TRACE_MAX)
        return [out[i].as_dict() for i in range(n)]

    def peek(self, address: int, n: int) -> bytes | None:
        """``n`` bytes at ``address`` of this process, or None where it is not readable."""
        buf = ctypes.create_string_buffer(n)
        return None if self._lib.bullet_tpc_peek(address, buf, n) else buf.raw

    def hook_stats(self) -> dict:
        stats = HookStats()
        self._check(self._lib.bullet_tpc_hook_stats(ctypes.byref(stats)), "reading hook stats")
        return stats.as_dict()

    def hook_reset_stats(self) -> None:
        self._lib.bullet_tpc_hook_reset_stats()

    def hook_callback(self, domain: int, cbid: int, params: int | None) -> None:
        """Call the launch callback directly (tests feed it fake descriptors)."""
        self._lib.bullet_tpc_hook_callback(None, domain, cbid, params)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[NativeLib | None, str]:
    tried = candidates()
    for path in tried:
        if path.is_file():
            try:
                return NativeLib(path), ""
            except (OSError, TpcNativeError) as exc:
                return None, f"native library {path} cannot be loaded ({exc}); {BUILD_HINT}"
    where = "BULLET_TPC_LIB=" + str(tried[0]) if os.environ.get("BULLET_TPC_LIB") else ", ".join(map(str, tried[:3])) + ", ..."
    return None, f"native library not built: {LIB_NAME} not found (looked at {where}); {BUILD_HINT}"


def unavailable_reason() -> str:
    return _load()[1]


def load() -> NativeLib:
    lib, why = _load()
    if lib is None:
        raise TpcNativeError(why)
    return lib
