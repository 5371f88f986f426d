"""The goodput table across serving runs (``bullet bench-serving --report FILES``).

Each file is one engine's sweep (``serving-<label>-<gpu>-<date>.json``, or the same compressed,
``.json.xz`` or ``.json.gz``: the repository keeps measured runs as ``.json.xz``, a quarter of
the size, because every GPU call carries the working tree within a fixed budget). Per TPOT
target, the
table gives each engine's goodput (highest offered rate at which >= 90% of requests met both
SLOs), the best of our chunked runs (``chunked<size>`` labels: the best chunk for that target),
the best of our bullet runs (``bullet*`` labels, e.g. one per policy TPOT target), and bullet's
ratio to the best baseline, SGLang included.

Files with the same label continue one sweep (the same server measured again at higher rates
in a later device call): their rows are joined and the goodputs recomputed.

A goodput equal to the highest rate a run measured is a lower bound: the engine met the
targets at every rate offered, so it might serve more. Such cells read ``22+``, and a ratio
involving one reads as a bound (``>= 1.38``) or, when both sides are at their top, ``n/a``.
"""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path
from typing import Sequence

PREFIX = "goodput_tpot_"


def load(paths: Sequence[str | Path]) -> dict[str, dict]:
    docs = {}
    for p in paths:
        raw = Path(p).read_bytes()
        unpack = {".gz": gzip.decompress, ".xz": lzma.decompress}.get(Path(p).suffix, bytes)
        doc = json.loads(unpack(raw))
        name = doc.get("benchmark", "")
        if not name.startswith("serving-"):
            raise ValueError(f"{p} is not a bench-serving result (benchmark {name!r})")
        label = name.removeprefix("serving-")
        docs[label] = _continue(docs[label], doc, p) if label in docs else doc
    if not docs:
        raise ValueError("no result files given")
    return docs


# what must agree for two files of one label to be one sweep measured in two device calls
_SAME_SWEEP = ("device", "commit", "trace", "num_prompts", "ttft_slo_ms", "driver")


def _continue(first: dict, more: dict, path: str | Path) -> dict:
    """One sweep from two files with the same label (a device call ends at ten minutes, so a
    sweep's higher rates may come from the next call on the same running server): the rows
    joined in rate order and each goodput recomputed from them with the SLOs it was made with.
    Files that differ in device, commit, trace or SLOs, or that measured one rate twice, are
    refused rather than silently mixed."""
    from .metrics import goodput

    differ = [k for k in _SAME_SWEEP if first.get(k) != more.get(k)]
    if _targets(first) != _targets(more):
        differ.append("goodput targets")
    if differ:
        raise ValueError(f"{path} has the label of an earlier file but differs in {', '.join(differ)}: "
                         "files of one label must continue one sweep (rename one to compare them)")
    twice = {r.get("rate") for r in first.get("rows", [])} & {r.get("rate") for r in more.get("rows", [])}
    if twice:
        raise ValueError(f"{path} measured rate(s) {sorted(twice)} that an earlier file of its label "
                         "measured too: keep one of them")
    rows = sorted(first.get("rows", []) + more.get("rows", []), key=lambda r: r["rate"])
    summary = {key: goodput(rows, g["ttft_slo_s"], g["tpot_slo_s"],
                            **{k: g[k] for k in ("attainment", "percentile") if k in g})
               for key, g in first["summary"].items()}
    return {**first, "rows": rows, "summary": summary, "rates": [r["rate"] for r in rows]}


def _targets(doc: dict) -> dict:
    """Each goodput's SLOs and thresholds, by summary key."""
    keys = ("ttft_slo_s", "tpot_slo_s", "attainment", "percentile")
    return {name: tuple(g.get(k) for k in keys) for name, g in doc.get("summary", {}).items()}


def _top_rate(doc: dict) -> float | None:
    rates = [r["rate"] for r in doc.get("rows", []) if isinstance(r.get("rate"), (int, float))]
    return max(rates) if rates else None


def goodput_rows(docs: dict[str, dict]) -> list[dict]:
    """One row per TPOT target: ``{"tpot_ms", <label>: req/s or None, ..., "chunked-best",
    "bullet-best", "bullet_vs_best_baseline", "at_top": labels whose goodput is their top rate,
    "ratio_bound": "=", ">=", "<=" or "n/a"}``."""
    targets = sorted({float(k.removeprefix(PREFIX).removesuffix("ms"))
                      for doc in docs.values() for k in doc["summary"] if k.startswith(PREFIX)})
    rows = []
    for t in targets:
        key = f"{PREFIX}{t:g}ms"
        row: dict = {"tpot_ms": t}
        at_top = set()
        for label, doc in docs.items():
            g = doc["summary"].get(key)
            row[label] = None if g is None else g.get("by_attainment")
            if row[label] is not None and row[label] == _top_rate(doc):
                at_top.add(label)
        chunked_label = _best(row, [k for k in docs if k.startswith("chunked")], at_top)
        row["chunked-best"] = row[chunked_label] if chunked_label else None
        bullet_label = _best(row, [k for k in docs if k.startswith("bullet")], at_top)
        row["bullet-best"] = row[bullet_label] if bullet_label else None
        baseline_label = _best(row, [k for k in docs if not k.startswith(("bullet", "chunked"))]
                               + ([chunked_label] if chunked_label else []), at_top)
        best = row[baseline_label] if baseline_label else None
        # a bullet run that served no load where a baseline served some is a loss (0), not a blank
        ran_bullet = any(k.startswith("bullet") for k in docs)
        row["bullet_vs_best_baseline"] = (row["bullet-best"] or 0.0) / best if ran_bullet and best else None
        ours_top, base_top = bullet_label in at_top, baseline_label in at_top
        at_top |= {"chunked-best"} if chunked_label in at_top else set()
        at_top |= {"bullet-best"} if ours_top else set()
        row["ratio_bound"] = {(False, False): "=", (True, False): ">=", (False, True): "<=", (True, True): "n/a"}[
            (ours_top, base_top)]
        row["at_top"] = at_top
        rows.append(row)
    return rows


def _best(row: dict, labels: list[str], at_top: set[str]) -> str | None:
    """The label with the highest goodput in ``row`` (None where none served any load). Of equal
    goodputs, one at its run's top rate wins: it is a lower bound, so at least the exact one."""
    served = [k for k in labels if row.get(k)]
    return max(served, key=lambda k: (row[k], k in at_top)) if served else None


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
    meta = ("tpot_ms", "at_top", "ratio_bound")
    cols = [c for c in rows[0] if c not in meta]
    head = "| P90 TPOT target | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        lines.append(f"| <= {r['tpot_ms']:g} ms | " + " | ".join(_cell(r, c) for c in cols) + " |")
    return "\n".join(lines)


def _cell(row: dict, col: str) -> str:
    value = row[col]
    if value is None:
        return "-"
    if col == "bullet_vs_best_baseline":
        bound = row.get("ratio_bound", "=")
        return "n/a (both at their top rate)" if bound == "n/a" else f"{'' if bound == '=' else bound + ' '}{value:.2f}"
    return f"{value:g}+" if col in row.get("at_top", ()) else f"{value:g}"


def plot(docs: dict[str, dict], path: str | Path, title: str = "serving: P90 latency vs offered rate") -> Path:
    """One PNG of every run's P90 TTFT and P90 TPOT against offered rate (``--report --plot``)."""
    from .loadgen import plot_series

    return plot_series({label: doc.get("rows", []) for label, doc in docs.items()}, path, title)
