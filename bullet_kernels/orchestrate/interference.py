"""How much two co-running lanes slow each other, and whether co-running pays, from a profile.

A profile's co-run points (``bullet profile``) hold, for one split, a prefill layer group and a
decode step each timed alone on its lane and while both lanes loop together (only launches that
start and end while both run count), with the SM clock and power during the co-run. The profile
also holds both on the whole GPU. From those, per point:

- each lane's slowdown beside the other (co-run time / alone time on the same lane);
- the co-run **work rate**: in one millisecond of co-running, the prefill lane does
  ``1 / corun_prefill_ms`` layer groups, each worth ``whole_prefill_ms`` of whole-GPU time, and
  the decode lane ``1 / corun_decode_ms`` steps worth ``whole_decode_ms`` each. Their sum is the
  whole-GPU milliseconds of work done per millisecond: above 1 the split does more than running
  the two phases one after the other on the whole GPU, below 1 less. It assumes both lanes have
  work throughout (a serving mix decides how long they do), so it is the most co-running can
  gain at that point, before hand-offs and idle lanes.

``bullet profile --interference`` prints the table of a profile.
"""

from __future__ import annotations

import statistics

from .profile import WHOLE_GPU, Profile


def interference_rows(profile: Profile) -> list[dict]:
    """One row per co-run point of ``profile`` (see the module docstring for the fields)."""
    whole_prefill = {(p["tokens"], p["group"]): p["ms"] for p in profile.prefill if p["split"] == WHOLE_GPU}
    whole_decode = {(p["batch"], p["context"]): p["ms"] for p in profile.decode if p["split"] == WHOLE_GPU}
    rows = []
    for c in profile.corun:
        p, d = c["prefill"], c["decode"]
        wp, wd = whole_prefill.get((p["tokens"], p["group"])), whole_decode.get((d["batch"], d["context"]))
        rows.append({
            "split": c["split"], "prefill_tokens": p["tokens"], "prefill_group": p["group"],
            "decode_batch": d["batch"], "decode_context": d["context"],
            "prefill_alone_ms": p["alone_ms"], "prefill_corun_ms": p["corun_ms"],
            "prefill_slowdown": p["corun_ms"] / p["alone_ms"],
            "decode_alone_ms": d["alone_ms"], "decode_corun_ms": d["corun_ms"],
            "decode_slowdown": d["corun_ms"] / d["alone_ms"],
            "prefill_whole_ms": wp, "decode_whole_ms": wd,
            "work_rate": (wp / p["corun_ms"] + wd / d["corun_ms"]) if wp and wd else None,
            "work_rate_without_interference": (wp / p["alone_ms"] + wd / d["alone_ms"]) if wp and wd else None,
            "sm_clock_mhz": c.get("sm_clock_mhz"), "power_w": c.get("power_w"),
        })
    return rows


def summary(rows: list[dict]) -> dict:
    """Per split: the median slowdown of each lane and the median and best work rate."""
    out: dict = {}
    for split in dict.fromkeys(r["split"] for r in rows):
        mine = [r for r in rows if r["split"] == split]
        rates = [r["work_rate"] for r in mine if r["work_rate"] is not None]
        out[split] = {
            "prefill_slowdown_median": statistics.median(r["prefill_slowdown"] for r in mine),
            "decode_slowdown_median": statistics.median(r["decode_slowdown"] for r in mine),
            "work_rate_median": statistics.median(rates) if rates else None,
            "work_rate_best": max(rates) if rates else None,
        }
    return out


def _num(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(rows: list[dict]) -> str:
    head = ("| split | prefill tokens | decode batch x ctx | prefill alone / co-run ms (x) | "
            "decode alone / co-run ms (x) | work rate (no interference) | SM MHz | W |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['split']} | {r['prefill_tokens']} | {r['decode_batch']} x {r['decode_context']} | "
            f"{r['prefill_alone_ms']:.2f} / {r['prefill_corun_ms']:.2f} ({r['prefill_slowdown']:.2f}) | "
            f"{r['decode_alone_ms']:.2f} / {r['decode_corun_ms']:.2f} ({r['decode_slowdown']:.2f}) | "
            f"{_num(r['work_rate'], '.2f')} ({_num(r['work_rate_without_interference'], '.2f')}) | "
            f"{_num(r['sm_clock_mhz'], '.0f')} | {_num(r['power_w'], '.0f')} |")
    return "\n".join(lines)
