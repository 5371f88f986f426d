"""Which TPC-mask mechanism holds on this GPU and driver? A diagnostic, not a benchmark.

Earlier run (H100, driver 580.159.04, bench/results/tpc-diagnose-h100-20261125.json): a mask
written into the stream object at the table offset 0x51c restricted nothing, while the launch
hook's next-launch mask did restrict the probe. This script studies the hook, reading driver
memory only through the callback's own params and writing only launch descriptors:

1. params: for launches on known streams (cuStreamCreate, torch's pool, a green context),
   which 8-byte word of the callback params holds the CUstream handle;
2. bit map: which SMs each of the 128 descriptor mask bits reaches (leave-one-out, so no
   probe ever runs with every live TPC disabled);
3. hook stream masks: a mask keyed by stream handle restricts launches on that stream only;
4. graphs: whether a mask present while a graph is captured / instantiated sticks to its
   replays, and whether replays pick up a mask from their stream, a thread or global mask.

    python bench/tpc_diagnose.py   # prints rows as it goes; writes bench/results/tpc-diagnose-<gpu>-<date>.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bullet_kernels import results  # noqa: E402
from bullet_kernels.device import query  # noqa: E402
from bullet_kernels.partition import probe, tpc_native  # noqa: E402
from bullet_kernels.partition.tpc import _create_stream, _destroy_stream  # noqa: E402
from bullet_kernels.partition.tpc_mask import TpcMask, probe_map  # noqa: E402

HOOK = (0xB, 0x1)


class Rows(list):
    """Print each row as it comes: a hang or crash in the driver must not hide the others."""

    def append(self, row):
        super().append(row)
        print(row, flush=True)


def traced_launch(lib, stream_handle: int, sm_count: int) -> list[dict]:
    out = torch.full((sm_count,), -1, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    lib.trace_start(8)
    probe.launch_probe(stream_handle, out, spin_us=1)
    torch.cuda.synchronize()
    lib.trace_start(0)
    return [r for r in lib.trace_read() if (r["domain"], r["cbid"]) == HOOK]


def stream_words(records: list[dict], handle: int) -> list[str]:
    """Where the handle sits: ``"w3"`` (params word 3) or ``"w7+0x18"`` (8 bytes at word 7 + 0x18)."""
    where = {f"w{i}" for r in records for i, w in enumerate(r["words"]) if w == handle}
    where |= {f"w{i}+{8 * j:#x}" for r in records for i, words in r["deref"].items() for j, w in enumerate(words) if w == handle}
    return sorted(where)


def full_green_stream(device_index: int):
    """(green ctx, its CUcontext handle, stream handle) holding every SM: an identity, no limit."""
    from bullet_kernels.device import check, driver_module

    drv = driver_module()
    dev = check(drv.cuDeviceGet(device_index), "cuDeviceGet")
    res = check(drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource")
    # The whole, unsplit resource is refused (CUDA_ERROR_NOT_SUPPORTED on driver 580): split
    # off the aligned part and hand both pieces to one descriptor.
    aligned = res.sm.smCount // 8 * 8
    groups, n_groups, rest = check(drv.cuDevSmResourceSplitByCount(1, res, 0, aligned), "cuDevSmResourceSplitByCount")
    parts = [groups[0]] + ([rest] if rest.sm.smCount else [])
    desc = check(drv.cuDevResourceGenerateDesc(parts, len(parts)), "cuDevResourceGenerateDesc")
    gctx = check(drv.cuGreenCtxCreate(desc, dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM), "cuGreenCtxCreate")
    ctx = check(drv.cuCtxFromGreenCtx(gctx), "cuCtxFromGreenCtx")
    stream = check(drv.cuGreenCtxStreamCreate(gctx, drv.CUstream_flags.CU_STREAM_NON_BLOCKING, 0), "cuGreenCtxStreamCreate")
    return gctx, int(ctx), int(stream)


def observe_on(stream_handle: int, sm_count: int) -> int:
    return len(probe.observed_sms(stream_handle, sm_count, waves=2, spin_us=5))


def graph_probe(capture_handle: int, sm_count: int):
    """(graph, out): a probe captured on ``capture_handle``."""
    out = torch.full((2 * sm_count,), -1, dtype=torch.int32, device="cuda")
    stream = torch.cuda.ExternalStream(capture_handle)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        probe.launch_probe(capture_handle, out, spin_us=5)
    torch.cuda.synchronize()
    return g, out


def replay_sms(g, out, replay_stream) -> int:
    out.fill_(-1)
    torch.cuda.synchronize()
    with torch.cuda.stream(replay_stream):
        g.replay()
    torch.cuda.synchronize()
    return len(probe.sms_written(out))


def main() -> int:
    if not torch.cuda.is_available():
        print("tpc_diagnose: no GPU here")
        return 1
    d = query()
    lib = tpc_native.load()
    torch.cuda.init()
    lib.hook_install()
    rows = Rows()
    n = d.sm_count
    print(f"driver {d.driver_api_version} ({d.kernel_driver}), {n} SMs", flush=True)
    own = [_create_stream(d.index) for _ in range(2)]
    pooled = [torch.cuda.Stream() for _ in range(2)]
    plain = torch.cuda.Stream()

    # 1. where the stream handle sits in the callback params (read-only)
    found: list[list[int]] = []
    for kind, handle in [("cuStreamCreate", h) for h, _ in own] + [("torch pool", s.cuda_stream) for s in pooled]:
        recs = traced_launch(lib, handle, n)
        words = stream_words(recs, handle)
        found.append(words)
        rows.append({"test": "params", "stream": kind, "handle": hex(handle), "callbacks": len(recs),
                     "size": recs[0]["size"] if recs else None,
                     "words": [hex(w) for w in recs[0]["words"]] if recs else [], "stream_at_words": words})
    common = sorted(set.intersection(*map(set, found))) if found else []
    rows.append({"test": "stream word", "common": common})

    # 1b. where the launch's context sits: torch's primary context and two full-SM green contexts
    from bullet_kernels.device import check, driver_module

    drv = driver_module()
    primary = int(check(drv.cuStreamGetCtx(drv.CUstream(pooled[0].cuda_stream)), "cuStreamGetCtx"))
    try:
        greens = [full_green_stream(d.index) for _ in range(2)]
    except RuntimeError as exc:
        rows.append({"test": "full-SM green contexts", "error": str(exc)})
        greens = []
    ctx_found = []
    for kind, ctx, handle in [("primary", primary, pooled[0].cuda_stream)] + [("green", c, h) for _, c, h in greens]:
        recs = traced_launch(lib, handle, n)
        where = stream_words(recs, ctx)
        ctx_found.append(where)
        rows.append({"test": "context in params", "kind": kind, "ctx": hex(ctx), "stream": hex(handle), "ctx_at": where,
                     "stream_at": stream_words(recs, handle), "words": [hex(w) for w in recs[0]["words"]] if recs else []})
    ctx_common = sorted(set.intersection(*map(set, ctx_found))) if greens else []
    rows.append({"test": "context word", "common": ctx_common})

    # 2. the descriptor bit -> SM map through the next-launch mask
    def observe_next(mask: TpcMask) -> frozenset[int]:
        out = torch.full((2 * n,), -1, dtype=torch.int32, device="cuda")
        torch.cuda.synchronize()  # the fill above must not take the next-launch mask
        lib.set_next_mask(mask.disabled_words())
        try:
            probe.launch_probe(plain.cuda_stream, out, spin_us=5)
        finally:
            lib.set_next_mask(None)
        torch.cuda.synchronize()
        return probe.sms_written(out)

    tmap = probe_map(observe_next, n, uuid=d.uuid, driver=str(d.driver_api_version))
    live = tmap.live_bits
    rows.append({"test": "bit map (next-launch)", "live_bits": str(TpcMask.from_tpcs(live)), "tpcs": len(live),
                 "sms_per_bit": sorted({len(s) for s in tmap.bits if s}),
                 "map": {b: sorted(s) for b, s in enumerate(tmap.bits) if s}})
    eight = tmap.mask_for(range(0, 8))
    sixteen_sms = len(tmap.sms(eight))
    rows.append({"test": "next-launch mask, 8 live bits", "bits": str(eight), "expected_sms": sixteen_sms,
                 "observed_sms": len(observe_next(eight))})

    # 3. hook stream masks keyed by the handle
    direct = [c for c in common if "+" not in c]
    if len(direct) == 1:
        lib.set_stream_word(int(direct[0][1:]))
        masked = own[0][0]
        lib.set_hook_stream_mask(masked, eight.disabled_words())
        try:
            rows.append({"test": "hook stream mask: masked stream", "expected_sms": sixteen_sms, "observed_sms": observe_on(masked, n)})
            rows.append({"test": "hook stream mask: other stream", "expected_sms": n, "observed_sms": observe_on(own[1][0], n)})
            # 4. graphs
            lib.hook_reset_stats()
            g, out = graph_probe(masked, n)
            cap_stats = lib.hook_stats()
            lib.set_hook_stream_mask(masked, None)
            rows.append({"test": "graph captured on hook-masked stream, replayed on a plain stream (mask removed)",
                         "expected_if_kept": sixteen_sms, "observed_sms": replay_sms(g, out, plain), "capture_stats": cap_stats,
                         "replay_calls": lib.hook_stats()["calls"] - cap_stats["calls"]})
            lib.set_hook_stream_mask(masked, eight.disabled_words())
            g2, out2 = graph_probe(pooled[0].cuda_stream, n)
            rows.append({"test": "graph captured unmasked, replayed on a hook-masked stream",
                         "observed_sms": replay_sms(g2, out2, torch.cuda.ExternalStream(masked))})
        finally:
            lib.set_hook_stream_mask(masked, None)
    else:
        rows.append({"test": "hook stream masks", "skipped": f"no unique direct stream word: {common}"})
    ctx_direct = [c for c in ctx_common if "+" not in c]
    if len(ctx_direct) == 1 and greens:
        lib.set_stream_word(int(ctx_direct[0][1:]))
        (_, ctx_a, stream_a), (_, ctx_b, stream_b) = greens
        lib.set_hook_stream_mask(ctx_a, eight.disabled_words())
        try:
            rows.append({"test": "context-keyed mask: green ctx A stream", "expected_sms": sixteen_sms, "observed_sms": observe_on(stream_a, n)})
            rows.append({"test": "context-keyed mask: green ctx B stream", "expected_sms": n, "observed_sms": observe_on(stream_b, n)})
            rows.append({"test": "context-keyed mask: primary ctx stream", "expected_sms": n, "observed_sms": observe_on(plain.cuda_stream, n)})
            ga, outa = graph_probe(stream_a, n)
            rows.append({"test": "context-keyed: graph captured on ctx A, replayed on a primary stream", "observed_sms": replay_sms(ga, outa, plain)})
            rows.append({"test": "context-keyed: graph captured on ctx A, replayed on ctx A stream",
                         "observed_sms": replay_sms(ga, outa, torch.cuda.ExternalStream(stream_a))})
            gp, outp = graph_probe(pooled[1].cuda_stream, n)
            rows.append({"test": "context-keyed: graph captured on primary, replayed on ctx A stream",
                         "observed_sms": replay_sms(gp, outp, torch.cuda.ExternalStream(stream_a))})
            x = torch.randn(4096, 4096, device="cuda")
            torch.cuda.synchronize()
            with torch.cuda.stream(torch.cuda.ExternalStream(stream_a)):
                y = x @ x  # a torch (cuBLAS) launch into the green stream: counted as a keyed write?
            torch.cuda.synchronize()
            rows.append({"test": "context-keyed: cuBLAS on ctx A stream", "stats": lib.hook_stats(), "finite": bool(torch.isfinite(y).all())})
        finally:
            lib.set_hook_stream_mask(ctx_a, None)
            lib.set_stream_word(-1)
    else:
        rows.append({"test": "context-keyed masks", "skipped": f"no unique direct context word: {ctx_common}"})
    lib.set_thread_mask(eight.disabled_words())
    try:
        g3, out3 = graph_probe(pooled[1].cuda_stream, n)
    finally:
        lib.set_thread_mask(None)
    rows.append({"test": "graph captured under a thread mask, replayed without", "expected_if_kept": sixteen_sms,
                 "observed_sms": replay_sms(g3, out3, plain)})
    g4, out4 = graph_probe(pooled[1].cuda_stream, n)
    lib.set_global_mask(eight.disabled_words())
    try:
        rows.append({"test": "graph captured unmasked, replayed under a global mask", "observed_sms": replay_sms(g4, out4, plain)})
    finally:
        lib.set_global_mask(None)
    lib.set_thread_mask(eight.disabled_words())
    try:
        rows.append({"test": "graph captured unmasked, replayed under a thread mask", "observed_sms": replay_sms(g4, out4, plain)})
    finally:
        lib.set_thread_mask(None)
    # 5. is the mask in force at a graph's first launch (upload) kept by later replays?
    m1, m2 = eight, tmap.mask_for(range(20, 28))

    names = {tmap.sms(m1): "mask A", tmap.sms(m2): "mask B", frozenset(range(n)): "every SM"}

    def replay_under(g, out, mask):
        """Which SMs a replay ran on: "mask A", "mask B", "every SM" or a count."""
        if mask is not None:
            lib.set_thread_mask(mask.disabled_words())
        try:
            out.fill_(-1)
            torch.cuda.synchronize()
            with torch.cuda.stream(plain):
                g.replay()
            torch.cuda.synchronize()
        finally:
            lib.set_thread_mask(None)
        seen = probe.sms_written(out)
        return names.get(seen, f"{len(seen)} other SMs")

    g5, out5 = graph_probe(pooled[1].cuda_stream, n)
    calls0 = lib.hook_stats()["calls"]
    first = replay_under(g5, out5, m1)
    calls1 = lib.hook_stats()["calls"]
    rows.append({"test": "sticky: 1st replay under mask A", "observed": first, "callbacks": calls1 - calls0})
    second = replay_under(g5, out5, None)
    calls2 = lib.hook_stats()["calls"]
    rows.append({"test": "sticky: 2nd replay, no mask", "observed": second, "callbacks": calls2 - calls1})
    rows.append({"test": "sticky: 3rd replay under mask B", "observed": replay_under(g5, out5, m2),
                 "callbacks": lib.hook_stats()["calls"] - calls2})
    # an explicit upload inside a thread mask, then replays without
    g6, out6 = graph_probe(pooled[1].cuda_stream, n)
    exec_handle = g6.raw_cuda_graph_exec()
    lib.set_thread_mask(m2.disabled_words())
    calls0 = lib.hook_stats()["calls"]
    try:
        check(drv.cuGraphUpload(drv.CUgraphExec(exec_handle), drv.CUstream(plain.cuda_stream)), "cuGraphUpload")
        plain.synchronize()
    finally:
        lib.set_thread_mask(None)
    rows.append({"test": "upload under mask B, 1st replay without", "observed": replay_under(g6, out6, None),
                 "upload_callbacks": lib.hook_stats()["calls"] - calls0})
    rows.append({"test": "upload under mask B, 2nd replay under mask A", "observed": replay_under(g6, out6, m1)})
    rows.append({"test": "hook stats", **lib.hook_stats()})
    for h, _ in own:
        _destroy_stream(d.index, h)
    summary = {r["test"]: r.get("observed_sms", r.get("observed")) for r in rows if "observed_sms" in r or "observed" in r}
    summary["stream_word"] = common
    path = results.write("tpc-diagnose", list(rows), summary)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
