"""The ``%smid`` probe: which SMs does a kernel launched on a stream actually run on?

The kernel is hand-written PTX loaded through the driver (cuLibraryLoadData), so it needs no
compiler and works for every backend (green-context streams, masked streams, plain streams).

Pitfall it avoids (docs/tpc-masks.md): many small blocks undercount, because dozens fit on one SM
and the scheduler need not spread them. Each probe block takes more than half of an SM's
shared memory and 1,024 threads, so exactly one block fits per SM; we launch several waves of
blocks that each spin a few microseconds, so every SM the stream may use gets a block.
"""

from __future__ import annotations

import ctypes
import functools

from ..device import check, driver_module

PROBE_PTX = r"""
.version 7.0
.target sm_70
.address_size 64

.visible .entry bullet_smid_probe(
    .param .u64 out_ptr,
    .param .u64 spin_ns
)
{
    .reg .pred %p<3>;
    .reg .b32 %r<4>;
    .reg .b64 %rd<9>;

    mov.u32 %r1, %tid.x;
    setp.ne.u32 %p1, %r1, 0;
    @%p1 bra DONE;
    ld.param.u64 %rd1, [out_ptr];
    ld.param.u64 %rd2, [spin_ns];
    mov.u32 %r2, %smid;
    mov.u32 %r3, %ctaid.x;
    mov.u64 %rd3, %globaltimer;
    add.u64 %rd4, %rd3, %rd2;
SPIN:
    mov.u64 %rd5, %globaltimer;
    setp.lt.u64 %p2, %rd5, %rd4;
    @%p2 bra SPIN;
    cvta.to.global.u64 %rd6, %rd1;
    mul.wide.u32 %rd7, %r3, 4;
    add.u64 %rd8, %rd6, %rd7;
    st.global.u32 [%rd8], %r2;
DONE:
    ret;
}
"""

THREADS = 1024


@functools.lru_cache(maxsize=None)
def probe_kernel(device_index: int):
    """``(kernel handle, dynamic shared bytes that force one block per SM, library)`` of the
    probe on ``device_index`` (loaded once; diagnostics launch it their own ways)."""
    drv = driver_module()
    dev = check(drv.cuDeviceGet(device_index), "cuDeviceGet")
    lib = check(
        drv.cuLibraryLoadData(PROBE_PTX.encode() + b"\0", None, None, 0, None, None, 0),
        "cuLibraryLoadData(probe PTX)",
    )
    kernel = check(drv.cuLibraryGetKernel(lib, b"bullet_smid_probe"), "cuLibraryGetKernel")
    attr = drv.CUdevice_attribute
    per_sm = check(
        drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR, dev),
        "cuDeviceGetAttribute",
    )
    optin = check(
        drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev),
        "cuDeviceGetAttribute",
    )
    smem = min(optin, per_sm // 2 + 4096)
    check(
        drv.cuKernelSetAttribute(
            drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem, kernel, dev
        ),
        "cuKernelSetAttribute(max dynamic shared memory)",
    )
    return kernel, smem, lib


def launch_probe(stream, out, spin_us: int = 20, device_index: int = 0) -> None:
    """Launch one probe block per element of ``out`` (int32, on the GPU) on ``stream``, no sync.

    Capture-safe: usable inside a CUDA graph capture on that stream. The kernel is resolved in
    the stream's own context (a green context for green lanes) with that context current:
    a context-independent kernel handle is otherwise resolved in whatever context the thread
    has current, and the launch could carry another partition's SMs.
    """
    drv = driver_module()
    kernel, smem, _ = probe_kernel(device_index)
    handle = stream.cuda_stream if hasattr(stream, "cuda_stream") else int(stream)
    cu_stream = drv.CUstream(handle)
    ctx = check(drv.cuStreamGetCtx(cu_stream), "cuStreamGetCtx")
    check(drv.cuCtxPushCurrent(ctx), "cuCtxPushCurrent(probe stream's context)")
    try:
        function = check(drv.cuKernelGetFunction(kernel), "cuKernelGetFunction")
        params = ((out.data_ptr(), spin_us * 1000), (ctypes.c_void_p, ctypes.c_uint64))
        check(
            drv.cuLaunchKernel(function, out.numel(), 1, 1, THREADS, 1, 1, smem, cu_stream, params, 0),
            "cuLaunchKernel(probe)",
        )
    finally:
        check(drv.cuCtxPopCurrent(), "cuCtxPopCurrent")


def observed_sms(stream, sm_count: int, device_index: int = 0, waves: int = 4, spin_us: int = 20) -> frozenset[int]:
    """SM ids that a probe launched on ``stream`` (torch stream or raw handle) ran on."""
    import torch

    drv = driver_module()
    handle = stream.cuda_stream if hasattr(stream, "cuda_stream") else int(stream)
    blocks = max(1, waves * sm_count)
    out = torch.full((blocks,), -1, dtype=torch.int32, device=f"cuda:{device_index}")
    # The output is written on `stream`, which the torch allocator does not know about:
    # finish torch's fill first, then sync the probe stream before reading.
    torch.cuda.synchronize(device_index)
    launch_probe(handle, out, spin_us, device_index)
    check(drv.cuStreamSynchronize(drv.CUstream(handle)), "cuStreamSynchronize(probe stream)")
    return sms_written(out)


def sms_written(out) -> frozenset[int]:
    """SM ids recorded in a probe output; refuses an output the probe did not fully write."""
    ids = out.cpu().tolist()
    if min(ids) < 0:
        raise RuntimeError(f"probe kernel did not write all {len(ids)} blocks; the launch did not complete")
    return frozenset(ids)


def observed_sms_next_launch(lib, stream, sm_count: int, disabled_words: list[int], device_index: int = 0,
                             waves: int = 2, spin_us: int = 5) -> frozenset[int]:
    """SM ids a probe on ``stream`` ran on under a next-launch mask of our launch hook (``lib``:
    the loaded libbullet_tpc). Nothing else is launched from this thread in between."""
    import torch

    handle = stream.cuda_stream if hasattr(stream, "cuda_stream") else int(stream)
    out = torch.full((max(1, waves * sm_count),), -1, dtype=torch.int32, device=f"cuda:{device_index}")
    torch.cuda.synchronize(device_index)  # the fill must not take the next-launch mask
    lib.set_next_mask(disabled_words)
    try:
        launch_probe(handle, out, spin_us, device_index)
    finally:
        lib.set_next_mask(None)
    torch.cuda.synchronize(device_index)
    return sms_written(out)
