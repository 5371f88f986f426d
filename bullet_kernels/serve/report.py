"""The goodput table across serving runs (``bullet bench-serving --report FILES``).

Each file is one engine's sweep (``serving-<label>-<gpu>-<date>.json``). Per TPOT target, the
table gives each engine's goodput (highest offered rate at which >= 90% of requests met both
SLOs), the best of our chunked runs (``chunked<size>`` labels: the best chunk for that target),
and bullet's ratio to the best baseline, SGLang included.
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
        baselines = [v for k, v in row.items() if k not in ("tpot_ms", "bullet") and not k.startswith("chunked") and v]
        baselines += [row["chunked-best"]] if row["chunked-best"] else []
        best = max(baselines) if baselines else None
        row["bullet_vs_best_baseline"] = (row["bullet"] / best) if row.get("bullet") and best else None
        rows.append(row)
    return rows


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
