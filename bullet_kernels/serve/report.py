"""The goodput table across serving runs (``bullet bench-serving --report FILES``).

Each file is one engine's sweep (``serving-<label>-<gpu>-<date>.json``). Per TPOT target, the
table gives each engine's goodput (highest offered rate at which >= 90% of requests met both
SLOs), the best of our chunked runs (``chunked<size>`` labels: the best chunk for that target),
the best of our bullet runs (``bullet*`` labels, e.g. one per policy TPOT target), and bullet's
ratio to the best baseline, SGLang included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

PREFIX = "goodput_tpot_"


def load(paths: Sequence[str | Path]) -> dict[str, dict]:
    docs = {}
    for p in paths:
        doc = json.loads(Path(p).read_text())
        name = doc.get("benchmark", "")
        if not name.startswith("serving-"):
            raise ValueError(f"{p} is not a bench-serving result (benchmark {name!r})")
        docs[name.removeprefix("serving-")] = doc
    if not docs:
        raise ValueError("no result files given")
    return docs


def goodput_rows(docs: dict[str, dict]) -> list[dict]:
    """One row per TPOT target: ``{"tpot_ms", <label>: req/s or None, ..., "chunked-best",
    "bullet_vs_best_baseline"}``."""
    targets = sorted({float(k.removeprefix(PREFIX).removesuffix("ms"))
                      for doc in docs.values() for k in doc["summary"] if k.startswith(PREFIX)})
    rows = []
    for t in targets:
        key = f"{PREFIX}{t:g}ms"
        row: dict = {"tpot_ms": t}
        for label, doc in docs.items():
            g = doc["summary"].get(key)
            row[label] = None if g is None else g.get("by_attainment")
        chunked = [row[k] for k in docs if k.startswith("chunked") and row[k] is not None]
        row["chunked-best"] = max(chunked) if chunked else None
        ours = [row[k] for k in docs if k.startswith("bullet") and row[k] is not None]
        row["bullet-best"] = max(ours) if ours else None
        baselines = [row[k] for k in docs if not k.startswith(("bullet", "chunked")) and row[k]]
        baselines += [row["chunked-best"]] if row["chunked-best"] else []
        best = max(baselines) if baselines else None
        row["bullet_vs_best_baseline"] = (row["bullet-best"] / best) if row["bullet-best"] and best else None
        rows.append(row)
    return rows


def gpu_rows(docs: dict[str, dict]) -> list[dict]:
    """Per run and rate: the SM clock and power the load generator sampled (where it could)."""
    out = []
    for label, doc in docs.items():
        for r in doc.get("rows", []):
            gpu = r.get("gpu") or {}
            if isinstance(gpu.get("sm_clock_mhz"), (int, float)):
                out.append({"label": label, "rate": r.get("rate"), "sm_clock_mhz": gpu["sm_clock_mhz"],
                            "sm_clock_mhz_min": gpu.get("sm_clock_mhz_min"), "power_w": gpu["power_w"],
                            "power_w_max": gpu.get("power_w_max")})
    return out


def gpu_markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no SM clock or power samples in these files)"
    lines = ["| run | rate (req/s) | SM clock median (min) MHz | power median (max) W |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['rate']:g} | {r['sm_clock_mhz']:.0f} ({r['sm_clock_mhz_min']:.0f}) | "
              f"{r['power_w']:.0f} ({r['power_w_max']:.0f}) |" for r in rows]
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no goodput in these files)"
    cols = [c for c in rows[0] if c != "tpot_ms"]
    head = "| P90 TPOT target | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = [("-" if r[c] is None else f"{r[c]:.2f}" if c == "bullet_vs_best_baseline" else f"{r[c]:g}") for c in cols]
        lines.append(f"| <= {r['tpot_ms']:g} ms | " + " | ".join(cells) + " |")
    return "\n".join(lines)
