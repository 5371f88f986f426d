"""Can green contexts and the tpc launch hook live in one process? (an investigation)

Asks the driver directly for a 32-SM green context before the hook is installed, after, and
after the callback is disabled again, and checks that a green partition opened before the
hook still holds. Finding on the H100 (driver 580.159.04, bench/results/green-vs-hook-h100-20261126.log),
written up in docs/tpc-masks.md: once the hook is subscribed the driver refuses new green
contexts (CUDA_ERROR_NOT_SUPPORTED), also with the callback disabled; sets opened before keep
working. tests/fresh_process/hook_mechanism_checks.py asserts the refusal on every GPU run.

    python bench/investigations/green_vs_hook.py
"""

from __future__ import annotations

import sys

from bullet_kernels.device import check, driver_module, query
from bullet_kernels.partition import SMSplit, get_backend, probe
from bullet_kernels.partition.tpc import diagnostics


def ask_driver_for_green_context(device_index: int, sms: int = 32) -> str:
    """"ok" or the driver's error: straight to cuGreenCtxCreate, past the green backend's guard."""
    drv = driver_module()
    dev = check(drv.cuDeviceGet(device_index), "cuDeviceGet")
    resource = check(drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource")
    groups, _, _ = check(drv.cuDevSmResourceSplitByCount(1, resource, 0, sms), "cuDevSmResourceSplitByCount")
    desc = check(drv.cuDevResourceGenerateDesc([groups[0]], 1), "cuDevResourceGenerateDesc")
    err, gctx = drv.cuGreenCtxCreate(desc, dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM)
    if err != drv.CUresult.CUDA_SUCCESS:
        return err.name
    check(drv.cuGreenCtxDestroy(gctx), "cuGreenCtxDestroy")
    return "ok"


def main() -> int:
    device = query()
    print(f"{device.name}, driver {device.driver_api_version} ({device.kernel_driver})", flush=True)
    print("before the hook:", ask_driver_for_green_context(device.index), flush=True)
    with get_backend("green").open(SMSplit(decode=40)) as kept:
        get_backend("tpc").install_hook()
        print("after installing the hook:", ask_driver_for_green_context(device.index), flush=True)
        lane = kept.lane("decode")
        seen = probe.observed_sms(lane.stream, device.sm_count)
        print(f"green set opened before the hook: {len(seen)} SMs (granted {lane.granted})", flush=True)
    diagnostics.set_hook_enabled(False)
    print("after disabling the callback (still subscribed):", ask_driver_for_green_context(device.index), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
