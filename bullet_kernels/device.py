"""GPU facts through the CUDA driver API (cuda-bindings), and a clean answer when there is no GPU.

We ask the driver directly rather than torch so the answer does not depend on torch's CUDA
build, and so green-context facts (minimum partition size, alignment) come from the same
source the green backend uses.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from .errors import NoGPUError


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    uuid: str
    sm_count: int
    tpc_count: int
    compute_capability: tuple[int, int]
    driver_api_version: int  # cuDriverGetVersion(), e.g. 13000 for CUDA 13.0
    kernel_driver: str  # e.g. "580.159.04", or "" where it cannot be read
    total_memory_bytes: int
    l2_bytes: int
    green_contexts: bool
    green_unavailable_reason: str
    min_partition_sms: int  # green contexts: smallest SM group the driver grants
    partition_alignment_sms: int  # green contexts: SM groups come in multiples of this

    @property
    def driver_api_version_str(self) -> str:
        return f"{self.driver_api_version // 1000}.{(self.driver_api_version % 1000) // 10}"

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["driver_api_version_str"] = self.driver_api_version_str
        return d


def driver_module():
    """``cuda.bindings.driver`` after a successful ``cuInit``; NoGPUError with the reason otherwise."""
    try:
        from cuda.bindings import driver
    except Exception as exc:  # ImportError, or a broken install
        raise NoGPUError(f"cuda-bindings is not importable ({exc}); install cuda-bindings>=13") from exc
    try:
        (err,) = driver.cuInit(0)
    except Exception as exc:  # cuda-bindings raises RuntimeError when libcuda is absent
        raise NoGPUError(f"no CUDA driver library in this process ({exc})") from exc
    if err != driver.CUresult.CUDA_SUCCESS:
        raise NoGPUError(f"cuInit failed: {err.name}")
    return driver


def check(result, what: str):
    """Unpack a cuda-bindings result tuple, raising with the call's name on error."""
    from cuda.bindings import driver

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, msg = driver.cuGetErrorString(err)
        text = msg.decode() if isinstance(msg, bytes) else str(msg)
        raise RuntimeError(f"{what} failed: {err.name} ({text})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _kernel_driver_version() -> str:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return ""
    for token in text.split():
        if token.count(".") >= 1 and token.replace(".", "").isdigit():
            return token
    return ""


@functools.lru_cache(maxsize=None)
def query(index: int = 0) -> DeviceInfo:
    """Facts of GPU ``index``. Raises NoGPUError if there is no usable GPU."""
    drv = driver_module()
    count = check(drv.cuDeviceGetCount(), "cuDeviceGetCount")
    if count == 0:
        raise NoGPUError("the CUDA driver reports no GPU")
    if not 0 <= index < count:
        raise NoGPUError(f"GPU index {index} does not exist; this machine has GPUs 0..{count - 1}")
    dev = check(drv.cuDeviceGet(index), "cuDeviceGet")
    attr = drv.CUdevice_attribute

    def get(a):
        return check(drv.cuDeviceGetAttribute(a, dev), f"cuDeviceGetAttribute({a.name})")

    name = check(drv.cuDeviceGetName(256, dev), "cuDeviceGetName")
    name = name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
    uuid_bytes = bytes(check(drv.cuDeviceGetUuid(dev), "cuDeviceGetUuid").bytes)
    h = uuid_bytes.hex()
    uuid = f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
    sm_count = get(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
    cc = (
        get(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
        get(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
    )
    green, reason, min_sms, align = _green_facts(drv, dev)
    return DeviceInfo(
        index=index,
        name=name,
        uuid=uuid,
        sm_count=sm_count,
        # Volta and later pair SMs into TPCs; the mask bits address TPCs.
        tpc_count=sm_count // 2 if cc[0] >= 7 else sm_count,
        compute_capability=cc,
        driver_api_version=check(drv.cuDriverGetVersion(), "cuDriverGetVersion"),
        kernel_driver=_kernel_driver_version(),
        total_memory_bytes=check(drv.cuDeviceTotalMem(dev), "cuDeviceTotalMem"),
        l2_bytes=get(attr.CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE),
        green_contexts=green,
        green_unavailable_reason=reason,
        min_partition_sms=min_sms,
        partition_alignment_sms=align,
    )


def _green_facts(drv, dev) -> tuple[bool, str, int, int]:
    """Whether green contexts work here, and the SM granularity the driver imposes."""
    if not hasattr(drv, "cuDeviceGetDevResource"):
        return False, "cuda-bindings has no green-context API (need >= 12.4)", 0, 0
    try:
        res = check(
            drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
            "cuDeviceGetDevResource",
        )
    except RuntimeError as exc:
        return False, str(exc), 0, 0
    sm = res.sm
    # Older drivers leave these fields zero; 8/8 is what Hopper reports (docs/tpc-masks.md).
    min_sms = int(getattr(sm, "minSmPartitionSize", 0) or 8)
    align = int(getattr(sm, "smCoscheduledAlignment", 0) or 8)
    return True, "", min_sms, align


def describe_state(index: int = 0) -> tuple[DeviceInfo | None, str]:
    """``(info, "")`` when a GPU is usable, else ``(None, reason)``; never raises."""
    try:
        return query(index), ""
    except NoGPUError as exc:
        return None, str(exc)
