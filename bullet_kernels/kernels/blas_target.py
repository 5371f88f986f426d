"""cuBLAS matmuls sized for a partition: cuBLASLt's SM-count target, through torch.

cuBLAS picks its kernels (tile shape, split-K, persistent or not) for the SM count the device
reports, 132 on an H200, also inside a green context of 40 SMs: a grid planned for one wave on
132 SMs then runs several on the lane, with a ragged last wave. cuBLASLt takes a hint for this,
the matmul descriptor's SM-count target. torch sets that attribute on its cuBLASLt calls
when its (experimental) SM carveout is set, as ``device SMs - carveout``; torch's own use is to
leave SMs free for communication kernels. So inside :func:`cublaslt_sm_target` torch's matmuls
go to cuBLASLt (torch's preferred BLAS library) with the target set to the lane's SMs.

On Hopper the target mainly steers cuBLASLt's heuristics, and persistent kernels may ignore it
(PyTorch issue #183330, CUTLASS issue #2108): whether it helps is measured per lane and shape
(``BULLET_LINEAR=cublaslt-target``, bench/test_decode_partitions.py), not assumed.

Both settings are process-wide in torch, so the scope sets and restores them around each call,
under one lock: two threads running forwards would otherwise interleave their save and restore
and leave one thread's target set for everyone. A CUDA graph captured inside keeps the kernels
chosen at capture.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

from .sizing import device_sm_count

_torch_blas_settings = threading.RLock()  # guards torch's process-wide BLAS library and carveout


def carveout_for(sms: int, device_sms: int) -> int | None:
    """The carveout that makes torch's target ``sms``: None (no target) for the whole GPU."""
    if isinstance(sms, bool) or not isinstance(sms, int) or not 0 < sms <= device_sms:
        raise ValueError(f"an SM-count target must be an int in 1..{device_sms}, got {sms!r}")
    return None if sms == device_sms else device_sms - sms


@contextlib.contextmanager
def cublaslt_sm_target(sms: int) -> Iterator[None]:
    """torch matmuls inside go through cuBLASLt with SM-count target ``sms`` (CUDA only)."""
    carveout = carveout_for(sms, device_sm_count())
    with _torch_blas_settings:
        library = torch.backends.cuda.preferred_blas_library()
        previous = torch._C._get_sm_carveout_experimental()
        try:
            try:
                torch.backends.cuda.preferred_blas_library("cublaslt")
            except RuntimeError as exc:
                raise RuntimeError(f"BULLET_LINEAR=cublaslt-target needs a torch built with cuBLASLt: {exc}") from exc
            torch._C._set_sm_carveout_experimental(carveout)
            yield
        finally:
            torch._C._set_sm_carveout_experimental(previous)
            torch.backends.cuda.preferred_blas_library(library)
