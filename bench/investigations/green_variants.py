"""Does any way of making green lanes stop a growing lane from losing SMs? (issue #10)

The failing sequence of ``green_cause.py`` (Inductor graphs, then ``prefill=96,decode=36``,
``104,28``, ``112,20`` opened one after another, each used by prefill and decode before the next
opens), with every split opened unverified and every lane probed ``FADE_PROBES`` times right
after it opens and again after all the work. Measured before (docs/green-contexts.md): a growing
prefill lane runs on the previous prefill lane's SMs on some launches and on all of its own on
others. Each variant runs in a fresh process:

- ``baseline``: the library as it ships (one ``cuDevSmResourceSplitByCount`` per lane, off the
  remainder of the device's SMs);
- ``close``: each split's set is closed (its green contexts destroyed) once its work is done:
  right after the next split's contexts are made, before anything is launched on them (the
  library's ``Partitioner.release`` does the same close): is it the *living* earlier context
  whose SMs the new lane loses?
- ``atoms``: ``BULLET_GREEN_CARVE=atoms``: the device's SMs split once per process into groups
  of the alignment size, every lane of every split a list of those groups
  (``cuDevResourceGenerateDesc`` takes several resources of one split): lanes of different
  splits then share the driver's resource objects, not only SM ids;
- ``conn1``, ``conn8``, ``conn32``: the baseline under ``CUDA_DEVICE_MAX_CONNECTIONS`` 1, 8 and 32
  (how many hardware work queues a context's streams map onto).

    python3 bench/investigations/green_variants.py [all|VARIANT...]

Prints per variant the probes that saw fewer SMs than their lane was granted (and any probe
outside its lane), writes ``$OUT/green-variants.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

VARIANTS = ("baseline", "close", "atoms", "conn1", "conn8", "conn32")
ENV = {"conn1": {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}, "conn8": {"CUDA_DEVICE_MAX_CONNECTIONS": "8"},
       "conn32": {"CUDA_DEVICE_MAX_CONNECTIONS": "32"}, "atoms": {"BULLET_GREEN_CARVE": "atoms"}}
PROBES = int(os.environ.get("FADE_PROBES", "12"))


def one(variant: str) -> dict:
    import torch

    from bench.investigations.green_cause import work
    from bullet_kernels import Partitioner
    from bullet_kernels.partition import probe
    from bullet_kernels.partition.base import format_ranges

    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    rows, opened = [], []

    def probe_lanes(pset, when: str) -> None:
        for lane in pset.lanes.values():
            seen = [probe.observed_sms(lane.stream, sm_count) for _ in range(PROBES)]
            first = seen[0]
            rows.append({"split": pset.split.key, "lane": lane.name, "granted": lane.granted, "when": when,
                         "counts": [len(s) for s in seen], "first": format_ranges(sorted(first)),
                         "union": format_ranges(sorted(set().union(*seen)))})
            print(f"{variant} {when} {pset.split.key}:{lane.name} (granted {lane.granted}): {[len(s) for s in seen]}",
                  flush=True)

    def after_open(pset) -> None:
        if variant == "close" and opened:
            opened[-1].close()  # the previous split's work is done: destroy its contexts first
        opened.append(pset)
        probe_lanes(pset, "open")

    with Partitioner("green", verify=False) as parts:
        work(parts, after_open=after_open)
        for pset in parts.open_sets():
            if not pset.closed:
                probe_lanes(pset, "after")
    short = sum(n < r["granted"] for r in rows for n in r["counts"])
    return {"variant": variant, "short": short, "probes": sum(len(r["counts"]) for r in rows), "rows": rows}


def main(args: list[str]) -> int:
    if args and args[0] == "--one":
        print("RESULT " + json.dumps(one(args[1])), flush=True)
        return 0
    names = list(VARIANTS) if not args or args == ["all"] else args
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variant(s) {unknown}; variants: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    results = {}
    for name in names:
        env = {**os.environ, **ENV.get(name, {})}
        out = subprocess.run([sys.executable, __file__, "--one", name], env=env, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            results[name] = {"error": f"rc {out.returncode}: {out.stderr[-1500:]}"}
            print(f"{name}: failed: {out.stderr[-800:]}", flush=True)
            continue
        results[name] = json.loads(line.removeprefix("RESULT "))
        r = results[name]
        print(f"{name}: {r['short']} of {r['probes']} probes on fewer SMs than granted", flush=True)
        for row in r["rows"]:
            if any(n < row["granted"] for n in row["counts"]):
                print(f"   {row['when']} {row['split']}:{row['lane']} granted {row['granted']}: {row['counts']}")
    with open(os.path.join(os.environ.get("OUT", "."), "green-variants.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
