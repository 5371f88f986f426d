"""Benchmark result files in the project's schema: one JSON per run, its plot beside it.

``bench/results/<benchmark>-<gpu>-<yyyymmdd>.json`` holds
``{"benchmark", "device", "sms", "driver", "torch", "commit", "timestamp", "command",
"power_limit_w", "sm_clock_max_mhz", ...run facts..., "rows": [...], "summary": {...}}``;
simulated runs add ``"simulated": true``. Rows keep raw per-call samples or percentiles, not
only means, and the SM clock and power measured beside them (:mod:`bullet_kernels.measure`).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REQUIRED = {"benchmark": str, "device": str, "sms": int, "driver": str, "torch": str, "commit": str,
            "timestamp": str, "command": str, "rows": list, "summary": dict}
BENCHMARK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def commit() -> str:
    """The commit results are stamped with: ``BULLET_COMMIT`` where set (a copied checkout's .git
    may name another commit than the code it holds), else git's."""
    return os.environ.get("BULLET_COMMIT") or git_commit()


def environment() -> dict:
    """Device, driver, torch, commit, power limit and top SM clock of this run (empty device
    fields without a GPU). ``BULLET_COMMIT`` stamps the commit where the checkout has no .git."""
    import torch

    from .device import describe_state
    from .measure import gpu_limits

    info, reason = describe_state()
    env = {
        "device": info.name if info else f"none ({reason})",
        "sms": info.sm_count if info else 0,
        "driver": f"{info.kernel_driver} (CUDA {info.driver_api_version_str})" if info else "",
        "torch": torch.__version__,
        "commit": commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if info:
        limits = gpu_limits(info.index)
        env.update(power_limit_w=limits["power_limit_w"], sm_clock_max_mhz=limits["sm_clock_max_mhz"])
    return env


def gpu_slug(device: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100"; "NVIDIA H200" -> "h200"; no GPU -> "cpu"."""
    if device.startswith("none"):
        return "cpu"
    for token in device.lower().replace("-", " ").split():
        if token[:1] in "abhlv" and token[1:].isdigit():
            return token
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-").split("-")[-1] or "gpu"


def result_path(benchmark: str, device: str, timestamp: str, out_dir: str | Path = "bench/results") -> Path:
    """``<out_dir>/<benchmark>-<gpu>-<yyyymmdd>.json`` for an ISO ``timestamp``."""
    check_name(benchmark)
    stamp = datetime.datetime.fromisoformat(timestamp).strftime("%Y%m%d")
    return Path(out_dir) / f"{benchmark}-{gpu_slug(device)}-{stamp}.json"


def check_name(benchmark: str) -> None:
    if not BENCHMARK_NAME.fullmatch(benchmark):
        raise ValueError(
            f"benchmark name {benchmark!r} must be lower-case letters, digits, '-' or '_' "
            "(it becomes the start of the file name)"
        )


def validate(doc: dict) -> None:
    """Raise ValueError naming every field of ``doc`` that breaks the results schema."""
    problems = [f"missing {key!r}" for key in REQUIRED if key not in doc]
    problems += [
        f"{key!r} must be {kind.__name__}, got {type(doc[key]).__name__}"
        for key, kind in REQUIRED.items()
        if key in doc and not (isinstance(doc[key], kind) and not isinstance(doc[key], bool))
    ]
    if isinstance(doc.get("rows"), list):
        problems += [f"rows[{i}] must be a dict, got {type(r).__name__}" for i, r in enumerate(doc["rows"]) if not isinstance(r, dict)]
    if isinstance(doc.get("benchmark"), str) and not BENCHMARK_NAME.fullmatch(doc["benchmark"]):
        problems.append(f"benchmark name {doc['benchmark']!r} is not lower-case letters, digits, '-' or '_'")
    if problems:
        raise ValueError("results document breaks the schema: " + "; ".join(problems))


def write(benchmark: str, rows: list[dict], summary: dict, out_dir: str | Path = "bench/results",
          compact: bool = False, **extra) -> Path:
    """Write one run as ``<out_dir>/<benchmark>-<gpu>-<yyyymmdd>.json``; returns the path.

    ``extra`` holds run facts (model, shapes, backend...) placed beside the environment.
    ``compact``: one line per row instead of indented JSON (rows holding long arrays, such as a
    serving sweep's per-token times, would otherwise take one line per number).
    """
    check_name(benchmark)
    env = environment()
    doc = {"benchmark": benchmark, **env, **extra, "rows": rows, "summary": summary}
    validate(doc)
    path = result_path(benchmark, env["device"], env["timestamp"], out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(doc, compact) + "\n")
    return path


def dumps(doc: dict, compact: bool = False) -> str:
    if not compact:
        return json.dumps(doc, indent=2, default=str)
    head = {k: v for k, v in doc.items() if k != "rows"}
    rows = ",\n".join(json.dumps(r, separators=(",", ":"), default=str) for r in doc["rows"])
    text = json.dumps(head, indent=2, default=str)
    return text[:-2] + f',\n  "rows": [\n{rows}\n  ]\n}}'  # the rows last, one per line


class Recorder:
    """Rows of one benchmark run, collected as they are measured and written once.

    >>> rec = Recorder("decode", "bench/results", backend="green")
    >>> rec.add({"kind": "copy", "sms": 32, "median_ms": 0.71})
    >>> path = rec.write({"headline": 1.2})
    """

    def __init__(self, benchmark: str, out_dir: str | Path = "bench/results", **extra):
        check_name(benchmark)
        self.benchmark = benchmark
        self.out_dir = Path(out_dir)
        self.extra = extra
        self.rows: list[dict] = []

    def add(self, row: dict) -> dict:
        if not isinstance(row, dict):
            raise TypeError(f"a result row is a dict, got {type(row).__name__}")
        self.rows.append(row)
        return row

    def write(self, summary: dict | None = None, **extra) -> Path:
        return write(self.benchmark, self.rows, summary or {}, self.out_dir, **self.extra, **extra)


def save_figure(fig, path: str | Path, title: str) -> Path:
    """Title ``fig``, save it as PNG beside the results JSON at ``path``, close it; the PNG path."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
