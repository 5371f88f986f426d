"""``bullet`` command line: ``bullet info`` (device, backends, verified partition table) and
``bullet sweep`` (prefill/decode latency against SM count; the main job until the orchestrator lands).
"""

from __future__ import annotations

import argparse
import warnings
import json
import sys

from . import __version__
from .device import describe_state
from .errors import BulletError

DEFAULT_INFO_SPLITS = ("prefill=96,decode=36", "prefill=104,decode=28", "decode=16")


def _native_state() -> str:
    try:
        from .partition import tpc_native

        lib = tpc_native.load()
        return f"loaded ({lib.path})"
    except Exception as exc:  # ImportError, or the loader's own reason
        return f"missing: {exc}"


def info(args: argparse.Namespace) -> int:
    from .partition import Partitioner, SMSplit, available_backends

    device, reason = describe_state(args.device)
    report: dict = {"bullet_kernels": __version__, "native_tpc_library": _native_state()}
    print(f"bullet_kernels {__version__}")
    print(f"native TPC-mask library: {report['native_tpc_library']}")
    if device is None:
        report["device"] = None
        report["no_gpu_reason"] = reason
        print(f"GPU: none ({reason})")
    else:
        report["device"] = device.as_dict()
        cc = ".".join(map(str, device.compute_capability))
        print(
            f"GPU {device.index}: {device.name} ({device.uuid}), {device.sm_count} SMs / {device.tpc_count} TPCs, "
            f"cc {cc}, CUDA driver API {device.driver_api_version_str} (kernel driver {device.kernel_driver or '?'}), "
            f"{device.total_memory_bytes / 2**30:.1f} GiB, L2 {device.l2_bytes / 2**20:.0f} MiB"
        )
        if device.green_contexts:
            print(
                f"green contexts: yes (min partition {device.min_partition_sms} SMs, "
                f"alignment {device.partition_alignment_sms})"
            )
        else:
            print(f"green contexts: no ({device.green_unavailable_reason})")
    backends = available_backends(device)
    report["backends"] = backends
    print("backends:")
    for name, why in backends.items():
        print(f"  {name:6s} {'available' if not why else 'unavailable: ' + why}")
    report["partitions"] = []
    if device is not None and not args.no_verify:
        splits = args.split or list(DEFAULT_INFO_SPLITS)
        print("verified partitions (asked / granted / observed SMs by the %smid probe):")
        print(f"  {'backend':7s} {'split':28s} {'lane':8s} {'asked':>5s} {'granted':>7s} {'observed':>8s}  SM ids")
        for name in [b for b, why in backends.items() if not why and b != "none"]:
            for text in splits:
                split = SMSplit.parse(text)
                try:
                    # green runs before tpc (BACKENDS order): tpc's launch hook, once installed,
                    # stops green contexts from being created, which is expected here, not news.
                    with warnings.catch_warnings(), Partitioner(name, device.index) as parts:
                        warnings.filterwarnings("ignore", message=".*tpc launch hook.*")
                        pset = parts.get(split)
                        rows = pset.table()
                except BulletError as exc:
                    print(f"  {name:7s} {split.key:28s} refused: {exc}")
                    report["partitions"].append({"backend": name, "split": split.key, "error": str(exc)})
                    continue
                for row in rows:
                    print(
                        f"  {name:7s} {split.key:28s} {row['lane']:8s} {row['asked']:5d} {row['granted']:7d} "
                        f"{row['observed']:8d}  {row['sm_ids']}"
                    )
                    report["partitions"].append({"backend": name, "split": split.key, **row})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def sweep(args: argparse.Namespace) -> int:
    from .sweep import main as sweep_main

    return sweep_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bullet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="device facts, backends and a verified partition table")
    p_info.add_argument("--device", type=int, default=0)
    p_info.add_argument("--split", action="append", help="lane=SMS,... to verify (repeatable)")
    p_info.add_argument("--no-verify", action="store_true", help="skip creating partitions")
    p_info.add_argument("--json", help="also write the report as JSON to this path")
    p_info.set_defaults(func=info)

    p_sweep = sub.add_parser("sweep", help="prefill/decode latency against SM count (needs a GPU)")
    p_sweep.add_argument("--preset", default="llama-3.1-8b")
    p_sweep.add_argument("--quick", action="store_true", help="fewer SM counts and shapes")
    p_sweep.add_argument("--out", default="bench/results", help="folder for the JSON and PNG")
    p_sweep.add_argument("--backend", default="green")
    from .sweep import add_arguments

    add_arguments(p_sweep)
    p_sweep.set_defaults(func=sweep)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BulletError as exc:
        print(f"bullet: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
