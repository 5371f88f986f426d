"""A second ``%smid`` probe, loaded the way Triton and Inductor load their kernels.

Our probe (:mod:`.probe`) is a context-independent driver library resolved in the lane's
context. Triton loads each kernel as a module with whatever context is current (the primary
one), as Inductor's kernels are: a second path worth checking, since which SMs a launch may use
has depended on how its kernel was loaded in reports about green contexts
(docs/green-contexts.md). Each program spins a few microseconds so every SM the stream may
use gets one; 1,024 threads per program (at most two per SM on Hopper).
"""

from __future__ import annotations

from .probe import sms_written


try:  # module level, as every Triton kernel of ours: the JIT resolves names in module globals
    import triton
    import triton.language as tl

    @triton.jit
    def smid_probe_kernel(out_ptr, spin_ns):
        smid = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        t0 = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
        t = t0
        while t - t0 < spin_ns:
            t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                          pack=1)
        tl.store(out_ptr + tl.program_id(0), smid)

except Exception:  # pragma: no cover - depends on the install
    smid_probe_kernel = None


def triton_observed_sms(stream, sm_count: int, device_index: int = 0, waves: int = 4,
                        spin_us: int = 20) -> frozenset[int]:
    """SM ids that a Triton-loaded probe launched on ``stream`` (a torch stream) ran on."""
    import torch

    if smid_probe_kernel is None:
        raise RuntimeError("the Triton probe needs triton, which did not import")
    out = torch.full((max(1, waves * sm_count),), -1, dtype=torch.int32, device=f"cuda:{device_index}")
    torch.cuda.synchronize(device_index)  # the fill, on torch's stream, first
    with torch.cuda.stream(stream):
        smid_probe_kernel[(out.numel(),)](out, spin_us * 1000, num_warps=32)
    stream.synchronize()
    return sms_written(out)
