"""Where does a serving step's time go? The scheduler driven directly (no HTTP, no loop thread).

Builds what ``bullet serve`` builds (:func:`build_service`: preset model, runner with its graphs
captured, scheduler in MODE), adds requests on a Poisson schedule (the uniform trace's lengths)
as the steps advance in wall time, and runs to completion twice: once timed step by step (step time against the GPU
time of the decode graph alone at that batch), once under cProfile (host hot spots).

    python3 bench/investigations/serve_step_profile.py MODE [RATE] [N] [--tpot-slo-ms X] [--overlap]
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import io
import pstats
import random
import statistics
import time

import torch

from bullet_kernels.serve.app import ServeOptions, build_service
from bullet_kernels.serve.request import Request, SamplingParams
from bullet_kernels.serve.scheduler import Scheduler


def build(mode: str, tpot: float, chunk: int, overlap: bool = False) -> Scheduler:
    """The scheduler ``bullet serve`` builds (same options, graphs captured), with its serving
    thread stopped so this script can step it."""
    svc = build_service(ServeOptions(model="llama-3.1-8b", mode=mode, device="cuda", tpot_slo_ms=tpot,
                                     chunk_size=chunk, overlap=overlap))
    svc.engine.shutdown(drain=False, timeout_s=10)
    return svc.engine.scheduler


def drive(sched: Scheduler, rate: float, n: int, seed: int, record: bool):
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        arrivals.append((t, [rng.randrange(1000, 30000) for _ in range(rng.randint(512, 1536))], rng.randint(128, 384)))
    start = time.perf_counter()
    pending = collections.deque(arrivals)
    steps, first, last, count = [], {}, {}, {}
    while pending or sched.has_work():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            at, prompt, out = pending.popleft()
            rid = f"r{len(arrivals) - len(pending)}"
            sched.add(Request(rid, prompt, SamplingParams(max_new_tokens=out, ignore_eos=True)))
        if not sched.has_work():
            time.sleep(0.001)
            continue
        batch = len(sched.running)
        before = dict(sched.counters)
        t0 = time.perf_counter()
        events = sched.step()
        dt = time.perf_counter() - t0
        if record:  # what the step ran, from the counters it moved
            moved = [k for k in ("mixed_steps", "prefill_steps", "prefills") if sched.counters[k] > before.get(k, 0)]
            steps.append((batch, len(sched.prefilling) > 0, "+".join(moved) or "decode", dt))
        for ev in events:
            rid = ev.request.rid
            tnow = time.perf_counter()
            first.setdefault(rid, tnow)
            last[rid] = tnow
            count[rid] = ev.num_output
    tpots = [(last[r] - first[r]) / (count[r] - 1) * 1e3 for r in first if count[r] > 1]
    return steps, tpots


def decode_gpu_ms(sched: Scheduler, batch: int) -> float:
    """GPU time of the whole-GPU decode graph at ``batch`` (context ~1.2k), CUDA events."""
    r = sched.runner
    rids = [f"g{i}" for i in range(batch)]
    r.reserve([(rid, list(range(1, 1200))) for rid in rids])
    from bullet_kernels.engine.placement import WHOLE_GPU

    r.reserve([(rid, [1]) for rid in rids])
    ids, fb = r.plan_decode(rids, [1] * batch)
    step = r.prepare(ids, fb, WHOLE_GPU)
    for _ in range(3):
        step.launch(None)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        step.launch(None)
    e1.record()
    torch.cuda.synchronize()
    for rid in rids:
        r.release(rid)
    return e0.elapsed_time(e1) / 10


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("rate", type=float, nargs="?", default=10.0)
    ap.add_argument("n", type=int, nargs="?", default=100)
    ap.add_argument("--tpot-slo-ms", type=float, default=10.0)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--overlap", action="store_true")
    a = ap.parse_args()
    sched = build(a.mode, a.tpot_slo_ms, a.chunk, a.overlap)
    drive(sched, a.rate, 8, 1, False)  # warm-up
    steps, tpots = drive(sched, a.rate, a.n, 0, True)
    by = collections.defaultdict(list)
    for batch, prefilling, kind, dt in steps:
        by[(min(batch // 16 * 16, 128), prefilling, kind)].append(dt * 1e3)
    print(f"mode {a.mode} rate {a.rate} n {a.n}: {len(steps)} steps, TPOT p50 {statistics.median(tpots):.2f} "
          f"p90 {sorted(tpots)[int(0.9 * len(tpots))]:.2f} ms; counters {dict(sched.counters)}")
    print(f"runner: {sched.runner.stats}")
    print("batch-bucket prefilling         ran  steps  median-ms  p90-ms  total-s")
    for key in sorted(by):
        v = sorted(by[key])
        print(f"{key[0]:>12} {str(key[1]):>10} {key[2]:>11} {len(v):>6} {statistics.median(v):>10.2f} "
              f"{v[int(0.9 * len(v))]:>7.2f} {sum(v) / 1e3:>8.2f}")
    for b in (16, 32, 64):
        print(f"decode graph alone, whole GPU, batch {b}: {decode_gpu_ms(sched, b):.2f} ms")
    prof = cProfile.Profile()
    prof.enable()
    drive(sched, a.rate, a.n // 2, 2, False)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue()[:6000])


if __name__ == "__main__":
    main()
