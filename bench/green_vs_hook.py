"""Can green contexts and our launch hook live in one process? (diagnostic)

Creates a green-context partition, installs the TPC launch hook, then tries to create another
green context, and again after turning the hook's callback off. Prints one line per step.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bullet_kernels.partition import SMSplit, get_backend, tpc_native  # noqa: E402


def try_green(label: str) -> None:
    """Ask the driver itself: the green backend's own guard (which refuses once the hook is
    installed, on what this script found) is bypassed here."""
    installed, tpc_native._hook_installed = tpc_native._hook_installed, False
    try:
        with get_backend("green").open(SMSplit(decode=32)) as pset:
            print(f"{label}: green ok, {len(pset.lane('decode').observed_sms)} SMs", flush=True)
    except Exception as exc:  # report, keep going
        print(f"{label}: green FAILED: {exc}", flush=True)
    finally:
        tpc_native._hook_installed = installed


def main() -> int:
    torch.cuda.init()
    try_green("before hook")
    with get_backend("green").open(SMSplit(decode=40)) as kept:
        lib = tpc_native.load()
        lib.hook_install()
        try_green("after hook install")
        lane = kept.lane("decode")
        from bullet_kernels.partition import probe

        print("green set opened before the hook still holds:", len(probe.observed_sms(lane.stream, 132)), "SMs", flush=True)
    lib.hook_enable(False)
    print("hook callback disabled (still subscribed)", flush=True)
    try_green("after hook disable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
