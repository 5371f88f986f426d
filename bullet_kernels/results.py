"""Benchmark result files in the project's schema (design.md): one JSON per run, plot beside it.

``{"benchmark", "device", "sms", "driver", "torch", "commit", "timestamp", "command", "rows", "summary"}``
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("BULLET_COMMIT", "unknown")


def environment() -> dict:
    """Device, driver, torch and commit of this run (device fields empty without a GPU)."""
    import torch

    from .device import describe_state

    info, reason = describe_state()
    return {
        "device": info.name if info else f"none ({reason})",
        "sms": info.sm_count if info else 0,
        "driver": f"{info.kernel_driver} (CUDA {info.driver_api_version_str})" if info else "",
        "torch": torch.__version__,
        "commit": os.environ.get("BULLET_COMMIT") or git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def gpu_slug(device: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100"."""
    for token in device.lower().replace("-", " ").split():
        if token[:1] in "abhlv" and token[1:].isdigit():
            return token
    return "cpu" if device.startswith("none") else device.lower().split()[-1]


def write(benchmark: str, rows: list[dict], summary: dict, out_dir: str | Path = "bench/results", **extra) -> Path:
    env = environment()
    stamp = env["timestamp"][:10].replace("-", "")
    path = Path(out_dir) / f"{benchmark}-{gpu_slug(env['device'])}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": benchmark, **env, **extra, "rows": rows, "summary": summary}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
