"""libbullet_tpc through ctypes, without a GPU: the offset table, the record address behind the
handle's first word, compare-and-write, argument checks, and the launch hook's descriptor writes."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from bullet_kernels.partition.tpc import native
from bullet_kernels.partition.tpc.masks import TpcMask
from tpc_fakes import FakeDriverStream, FakeLaunch, native_or_skip

EMPTY = [0, 0, 0, 0, 0]


@pytest.fixture(scope="module")
def lib() -> native.NativeLib:
    return native_or_skip()


def test_offset_table(lib):
    assert lib.stream_mask_offset(13000) == 0x51C
    assert lib.stream_mask_offset(12080) == lib.stream_mask_offset(12070) == 0x4FC
    assert lib.stream_mask_offset(12030) == 0x49C
    for unknown in (11080, 12090, 13010, 0, -1):
        assert lib.stream_mask_offset(unknown) is None
    assert len(lib.known_offsets()) == 10


# ---- the record: *(void**)handle + offset ---------------------------------------------------------


def test_record_address_is_the_struct_pointer_in_the_handle_plus_the_offset(lib):
    fake = FakeDriverStream(0x51C)
    assert lib.record_address(fake.handle, 0x51C) == ctypes.addressof(fake.struct) + 0x51C
    assert lib.record_address(fake.handle, 0x4CC) == ctypes.addressof(fake.struct) + 0x4CC
    assert lib.read_record(fake.handle, 0x51C) == EMPTY  # the struct's zeros, not the handle's 0x5a bytes


def test_records_are_written_in_the_struct_and_nowhere_else(lib):
    fake = FakeDriverStream(0x51C)
    handle_bytes, struct_bytes = fake.obj.raw, fake.struct.raw
    masked = [1, *TpcMask.range(0, 8).disabled_words()]
    lib.replace_record(fake.handle, 0x51C, EMPTY, masked)
    assert fake.record == masked == lib.read_record(fake.handle, 0x51C)
    assert fake.obj.raw == handle_bytes  # the handle's object is never written
    changed = [i for i, (a, b) in enumerate(zip(struct_bytes, fake.struct.raw)) if a != b]
    assert changed and min(changed) >= 0x51C and max(changed) < 0x51C + 20
    lib.replace_record(fake.handle, 0x51C, masked, EMPTY)
    assert fake.struct.raw == struct_bytes


def test_read_before_write_refuses_a_record_that_is_not_what_we_expect(lib):
    fake = FakeDriverStream(0x51C)
    fake.poke([0, 0, 7, 0, 0])  # e.g. another field of a driver whose offset differs
    with pytest.raises(native.RecordMismatchError, match=r"holds \[0, 0, 0x7, 0, 0\], not the expected \[0, 0, 0, 0, 0\]; nothing written"):
        lib.replace_record(fake.handle, 0x51C, EMPTY, [1, 0xFF, 0, 0, 0])
    assert fake.record == [0, 0, 7, 0, 0]


@pytest.mark.parametrize("pointer, message", [
    (0, "not a pointer to a stream struct"),
    (8, "not a pointer to a stream struct"),
    (1 << 50, "not a pointer to a stream struct"),
    (0x8000, "is not readable memory"),  # below vm.mmap_min_addr: never mapped
])
def test_an_implausible_struct_pointer_is_refused_before_any_access(lib, pointer, message):
    fake = FakeDriverStream(0x51C)
    fake.set_struct_pointer(pointer)
    with pytest.raises(native.TpcNativeError, match=message):
        lib.read_record(fake.handle, 0x51C)
    with pytest.raises(native.TpcNativeError, match=message):
        lib.replace_record(fake.handle, 0x51C, EMPTY, [1, 1, 0, 0, 0])


def test_a_misaligned_struct_pointer_is_refused(lib):
    fake = FakeDriverStream(0x51C)
    fake.set_struct_pointer(ctypes.addressof(fake.struct) + 4)
    with pytest.raises(native.TpcNativeError, match="misaligned"):
        lib.record_address(fake.handle, 0x51C)


@pytest.mark.parametrize("stream, offset, message", [
    (0, 0x51C, "special stream"), (2, 0x51C, "special stream"),
    (0x8000, 0x51C, "not a live CUstream"),
    ("fake", 0x51D, "multiple of 4"), ("fake", -4, "multiple of 4"), ("fake", 0x10000, "multiple of 4"),
])
def test_bad_handles_and_offsets_are_refused(lib, stream, offset, message):
    fake = FakeDriverStream(0x51C)
    with pytest.raises(native.TpcNativeError, match=message):
        lib.read_record(fake.handle if stream == "fake" else stream, offset)


# ---- the launch hook ----------------------------------------------------------------------------------


@pytest.fixture
def hook(lib):
    lib.hook_reset_stats()
    lib.set_next_mask(None)
    lib.set_thread_mask(None)
    yield lib
    lib.set_next_mask(None)
    lib.set_thread_mask(None)


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


def test_next_mask_wins_over_the_thread_mask_once(hook):
    thread_mask = TpcMask.range(0, 16)
    hook.set_thread_mask(thread_mask.disabled_words())
    hook.set_next_mask(MASK.disabled_words())
    first, second = FakeLaunch({72: 0x40}), FakeLaunch({72: 0x40})
    first.fire(hook)
    second.fire(hook)
    assert first.u32(304) == MASK.disabled_words()[0] and second.u32(304) == thread_mask.disabled_words()[0]
    assert hook.hook_stats()["thread_writes"] == 1


def test_thread_mask_and_size_word_high_half(hook):
    launch = FakeLaunch({72: 0x40}, size=0x7FFF00000058)  # driver 580: stack bytes above the size
    hook.set_thread_mask(MASK.disabled_words())
    launch.fire(hook)
    hook.set_thread_mask(None)
    assert launch.u32(304) == MASK.disabled_words()[0] and launch.u32(0) >> 31 == 1
    stats = hook.hook_stats()
    assert stats["last_params_size"] == 0x58 and stats["thread_writes"] == 1
    again = FakeLaunch({72: 0x40}, size=88)
    again.fire(hook)  # cleared: untouched
    assert again.u32(304) == 0


def test_thread_masks_belong_to_their_thread(hook):
    import threading

    hook.set_thread_mask(MASK.disabled_words())
    other = FakeLaunch({72: 0x40})
    worker = threading.Thread(target=other.fire, args=(hook,))
    worker.start()
    worker.join()
    assert other.u32(304) == 0  # another thread's launch is not masked


def test_hook_install_without_driver_reports_instead_of_crashing(lib):
    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("this machine has a CUDA driver")
    except OSError:
        pass
    with pytest.raises(native.TpcNativeError, match="cannot load libcuda.so.1"):
        lib.hook_install()
    assert lib.hook_stats()["installed"] == 0


def test_hook_enable_needs_an_installed_hook(lib):
    if lib.hook_stats()["installed"]:
        pytest.skip("this process installed the real hook")
    with pytest.raises(native.TpcNativeError, match="hook is not installed"):
        lib.hook_enable(False)


def test_c_selftest_passes(lib):
    exe = lib.path.parent / "tpc_mask_selftest"
    if not exe.exists():
        pytest.skip("self test is built only by a plain CMake build")
    done = subprocess.run([str(exe)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ---- finding the library ------------------------------------------------------------------------------


def test_a_copy_of_another_abi_is_skipped_for_the_next_candidate(lib, tmp_path, monkeypatch):
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    source = tmp_path / "old.c"
    source.write_text("int bullet_tpc_abi_version(void) { return 2; }\n")
    stale = tmp_path / "stale" / native.LIB_NAME
    stale.parent.mkdir()
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(stale), str(source)], check=True)
    monkeypatch.setattr(native, "candidates", lambda: [stale, lib.path])
    native.find_library.cache_clear()
    try:
        found, why = native.find_library()
        monkeypatch.setattr(native, "candidates", lambda: [stale])
        native.find_library.cache_clear()
        _, why_stale = native.find_library()
    finally:
        native.find_library.cache_clear()
    assert found is not None and found.path == lib.path and why == ""
    assert f"{stale} has ABI version 2, this package needs {native.ABI_VERSION}; rebuild it" in why_stale
