"""Decode step times and bullet decisions read from SGLang server logs (plain or .xz).

SGLang logs a ``Decode batch`` line every 40 decode steps with the running batch and the
generation throughput over that window; batch x 1000 / throughput is the mean time of a step in
it (ms), prefill turns in the window included. Medians per batch range, for comparing servers
run on the same trace (docs/sglang-adapter.md's step tables come from this). For a bullet
server it also counts the stream groups chosen and prints the last overlapped-steps count and
the last step-feedback line.

    python3 bench/investigations/sglang_log_steps.py bench/results/sglang-*-server-*.log.xz
"""

from __future__ import annotations

import argparse
import collections
import lzma
import re
import statistics
from pathlib import Path

DECODE = re.compile(r"Decode batch, #running-req: (\d+).*gen throughput \(token/s\): ([\d.]+)")
GROUP = re.compile(r"bullet_sglang: stream group \d+, \(prefill, decode\) SMs \((\d+), (\d+)\)")
OVERLAPPED = re.compile(r"decode steps overlapped (\d+) of (\d+)")
FEEDBACK = re.compile(r"decode steps measured minus profiled \(ms\) by decode SMs: (.*)")
RANGE = 10  # batch sizes per row


def read(path: Path) -> list[str]:
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", errors="replace") as f:
        return f.readlines()


def step_ms_by_batch(lines: list[str]) -> dict[int, list[float]]:
    """{first batch of the range: [mean step ms of each logged window]}"""
    out: dict[int, list[float]] = collections.defaultdict(list)
    for line in lines:
        m = DECODE.search(line)
        if m and int(m[1]) > 0 and float(m[2]) > 0:
            batch = int(m[1])
            out[batch // RANGE * RANGE].append(batch * 1000 / float(m[2]))
    return dict(sorted(out.items()))


def summary(path: Path) -> str:
    lines = read(path)
    rows = [f"{path.name}"]
    steps = step_ms_by_batch(lines)
    rows.append("  decode step ms (median of windows): " + ", ".join(
        f"batch {b}-{b + RANGE - 1}: {statistics.median(v):.1f} ({len(v)})" for b, v in steps.items()))
    groups = collections.Counter(m.groups() for line in lines for m in [GROUP.search(line)] if m)
    if groups:
        rows.append("  stream groups chosen, (prefill, decode) SMs: " + ", ".join(
            f"{p}/{d} x{n}" for (p, d), n in sorted(groups.items(), key=lambda kv: -int(kv[0][1]))))
    overlapped = [m for line in lines for m in [OVERLAPPED.search(line)] if m]
    if overlapped:
        rows.append(f"  decode steps overlapped: {overlapped[-1][1]} of {overlapped[-1][2]} (last report)")
    feedback = [m for line in lines for m in [FEEDBACK.search(line)] if m]
    if feedback:
        rows.append(f"  last step feedback: {feedback[-1][1]}")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+", type=Path)
    for path in p.parse_args().logs:
        print(summary(path))


if __name__ == "__main__":
    main()
