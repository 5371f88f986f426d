"""Why does a green lane run on another lane's SMs after Inductor work? A diagnostic (issue #10).

Reproduces the failing state of ``tests/fresh_process/green_cross_lane_checks.py`` ("late":
three splits opened one after another while Inductor graphs run on the earlier ones), but opens
every split without verification, then looks at every lane six ways:

- ``library``: our probe (context-independent kernel from ``cuLibraryLoadData``, resolved with
  ``cuKernelGetFunction`` while the lane's context is current): what verification uses;
- ``library-primary``: the same kernel resolved with the primary context current, launched on
  the lane's stream (what a runtime launch with the primary context current looks like);
- ``module-lane``: a module loaded with ``cuModuleLoadData`` while the lane's context is current;
- ``module-primary``: a module loaded while the primary context is current (Triton's path);
- ``triton``: a Triton kernel reading ``%smid`` (loaded by Triton, as Inductor's kernels are);
- ``recreated``: a new green context of the same size made after the work.

and prints, per lane, the context ids (``cuCtxGetId``), the SM count each context reports
(``cuCtxGetDevResource``) and the ``CUfunction`` handle ``cuKernelGetFunction`` returned, so a
function shared between two lanes' contexts shows. Writes JSON to ``$OUT`` (or the cwd).

    python3 bench/investigations/green_cause.py [late|fresh|verified|fade]
    python3 bench/investigations/green_cause.py connections [REPEATS]

``fade`` opens each split without verification and probes every lane of it ``FADE_PROBES``
times in a row *before* any work runs there (then runs the work): does the wrong SM set come
only with a new context's first launches and then fade, or stay? If it fades, probing the same
set again (rather than making fresh contexts, which start over) would settle it.

``connections`` runs ``verified`` REPEATS times (default 3) in fresh processes for each
``CUDA_DEVICE_MAX_CONNECTIONS`` in (unset, 1, 8, 32) and tallies the first-attempt failures
(sets refused, and sets made again after a refusal); ``green_variants.py baseline conn1 conn8
conn32`` counts the short probes per setting instead, which says more (the wrong set comes and
goes from one probe to the next). The hypothesis it tests: a hardware work
queue shared by the contexts keeps the SM mask of the context that used it last, and the number
of queues (the variable sets how many a context's streams map onto) changes how often a lane's
work lands in one that another lane used.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys

import torch

from bullet_kernels import Partitioner, SMSplit
from bullet_kernels.device import check, driver_module
from bullet_kernels.partition import get_backend, probe
from bullet_kernels.partition.base import format_ranges
from bullet_kernels.partition.probe_triton import triton_observed_sms

SPLITS = [SMSplit.parse(s) for s in ("prefill=96,decode=36", "prefill=104,decode=28", "prefill=112,decode=20")]


FADE_PROBES = int(os.environ.get("FADE_PROBES", "8"))  # probes per lane in ``fade``


def work(parts: Partitioner, after_open=None, before_open=None) -> None:
    """The sequence that reproduced it: Inductor graphs of three backends on the whole GPU, then
    prefill and decode concurrently on the two lanes of each split (bench/test_compile_backend.py's
    model). tests/fresh_process/green_cross_lane_checks.py runs it too."""
    from bench.test_compile_backend import TinyGPT
    import bullet_kernels

    torch.manual_seed(0)
    model = TinyGPT().cuda().to(torch.bfloat16).eval()
    prompt = torch.randint(0, 32000, (1, 2048), device="cuda")
    step = torch.randint(0, 32000, (64, 1), device="cuda")
    with torch.no_grad():
        compiled = [torch.compile(model, backend=name, dynamic=False) for name in ("bullet", "cudagraphs")]
        compiled.append(torch.compile(model, mode="reduce-overhead", dynamic=False))
        for fn in compiled:
            for _ in range(3):
                fn(step, decode=True)
        fn = compiled[0]
        for split in SPLITS:
            if before_open is not None:  # the split about to open (the earlier ones' work is done)
                before_open(split)
            if after_open is not None:  # the split opened, nothing run on it yet
                after_open(parts.get(split))
            for _ in range(10):
                with bullet_kernels.on_lane("prefill", split, partitioner=parts, join=False):
                    fn(prompt)
                with bullet_kernels.on_lane("decode", split, partitioner=parts, join=False):
                    for _ in range(4):
                        fn(step, decode=True)
                torch.cuda.synchronize()


class Variants:
    def __init__(self, sm_count: int):
        self.drv = driver_module()
        self.sm_count = sm_count
        self.kernel, self.smem, _ = probe.probe_kernel(0)
        self.primary = check(self.drv.cuDevicePrimaryCtxRetain(check(self.drv.cuDeviceGet(0), "dev")), "retain")
        self.modules: dict[int, object] = {}

    def out(self):
        torch.cuda.synchronize()
        return torch.full((4 * self.sm_count,), -1, dtype=torch.int32, device="cuda")

    def launch(self, function, stream, out):
        drv = self.drv
        params = ((out.data_ptr(), 20_000), (ctypes.c_void_p, ctypes.c_uint64))
        check(drv.cuLaunchKernel(function, out.numel(), 1, 1, probe.THREADS, 1, 1, self.smem,
                                 drv.CUstream(stream.cuda_stream), params, 0), "launch")
        stream.synchronize()
        return probe.sms_written(out)

    def function_in(self, ctx):
        drv = self.drv
        check(drv.cuCtxPushCurrent(ctx), "push")
        try:
            return check(drv.cuKernelGetFunction(self.kernel), "cuKernelGetFunction")
        finally:
            check(drv.cuCtxPopCurrent(), "pop")

    def module_function(self, ctx):
        drv = self.drv
        key = int(ctx)
        if key not in self.modules:
            check(drv.cuCtxPushCurrent(ctx), "push")
            try:
                mod = check(drv.cuModuleLoadData(probe.PROBE_PTX.encode() + b"\0"), "cuModuleLoadData")
                fn = check(drv.cuModuleGetFunction(mod, b"bullet_smid_probe"), "cuModuleGetFunction")
                check(drv.cuFuncSetAttribute(fn, drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                             self.smem), "cuFuncSetAttribute")
            finally:
                check(drv.cuCtxPopCurrent(), "pop")
            self.modules[key] = fn
        return self.modules[key]

    def lane(self, lane) -> dict:
        drv = self.drv
        stream = lane.stream
        ctx = check(drv.cuStreamGetCtx(drv.CUstream(stream.cuda_stream)), "cuStreamGetCtx")
        row = {
            "granted": lane.granted,
            "at_open": format_ranges(sorted(lane.observed_sms)),
            "ctx_id": int(check(drv.cuCtxGetId(ctx), "cuCtxGetId")),
            "ctx_handle": hex(int(ctx)),
        }
        res = check(drv.cuCtxGetDevResource(ctx, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM), "cuCtxGetDevResource")
        row["ctx_sm_count"] = int(res.sm.smCount)
        fn_lane = self.function_in(ctx)
        fn_primary = self.function_in(self.primary)
        row["function_lane"] = hex(int(fn_lane))
        row["function_primary"] = hex(int(fn_primary))
        variants = {
            "library": lambda: self.launch(fn_lane, stream, self.out()),
            "library-primary": lambda: self.launch(fn_primary, stream, self.out()),
            "module-lane": lambda: self.launch(self.module_function(ctx), stream, self.out()),
            "module-primary": lambda: self.launch(self.module_function(self.primary), stream, self.out()),
            "triton": lambda: self.triton_sms(stream),
        }
        for name, run in variants.items():
            try:
                seen = run()
                row[name] = f"{len(seen)}: {format_ranges(sorted(seen))}"
            except Exception as exc:  # a diagnostic: record and go on
                row[name] = f"error: {exc}"
        return row

    def triton_sms(self, stream):
        return triton_observed_sms(stream, self.sm_count)


def verified() -> None:
    """The failing sequence with verification on (as in the library and the test); prints the
    refusal, or which sets were made again after refusals."""
    from bullet_kernels import BulletError

    try:
        with Partitioner("green") as parts:
            work(parts)
            reopened = parts.backend.reopened
        print(f"verified: every split opened and verified; {len(reopened)} set(s) made again after a refusal: "
              f"{reopened}")
    except BulletError as exc:
        print(f"verified: REFUSED: {exc}")


def fade() -> None:
    """Each split's lanes probed FADE_PROBES times right after opening, before their work."""
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    seen: dict[str, list[str]] = {}

    def probe_again(pset) -> None:
        for lane in pset.lanes.values():
            key = f"{pset.split.key}:{lane.name} (granted {lane.granted})"
            seen[key] = []
            for _ in range(FADE_PROBES):
                sms = probe.observed_sms(lane.stream, sm_count)
                seen[key].append(f"{len(sms)}: {format_ranges(sorted(sms))}")
            print(f"fade: {key}: SMs seen per probe: {[int(x.split(':')[0]) for x in seen[key]]}", flush=True)

    with Partitioner("green", verify=False) as parts:
        work(parts, after_open=probe_again)
    with open(os.path.join(os.environ.get("OUT", "."), "green-cause-fade.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "probes": seen}, f, indent=1)


def connections(repeats: int) -> None:
    import subprocess

    tally = {}
    for value in (None, "1", "8", "32"):
        env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
        if value is not None:
            env["CUDA_DEVICE_MAX_CONNECTIONS"] = value
        runs = []
        for _ in range(repeats):
            out = subprocess.run([sys.executable, __file__, "verified"], env=env, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("verified:")), "")
            made_again = re.search(r"(\d+) set\(s\) made again", line)
            runs.append({"refused": "REFUSED" in line, "reopened": int(made_again.group(1)) if made_again else 0,
                         "line": line or f"rc {out.returncode}: {out.stderr[-300:]}"})
        key = value or "unset"
        tally[key] = runs
        print(f"CUDA_DEVICE_MAX_CONNECTIONS={key}: {sum(r['refused'] for r in runs)} of {repeats} runs refused; "
              f"sets made again: {[r['reopened'] for r in runs]}", flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "green-cause-connections.json"), "w") as f:
        json.dump(tally, f, indent=1)


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "late"
    if mode == "verified":
        return verified()
    if mode == "fade":
        return fade()
    if mode == "connections":
        return connections(int(sys.argv[2]) if len(sys.argv) > 2 else 3)
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    report = {"mode": mode, "device": torch.cuda.get_device_name(0), "lanes": {}}
    parts = Partitioner("green", verify=False)
    if mode == "late":
        work(parts)
    else:
        for split in SPLITS:
            parts.get(split)
    v = Variants(sm_count)
    for pset in parts.open_sets():
        for lane in pset.lanes.values():
            report["lanes"][f"{pset.split.key}:{lane.name}"] = v.lane(lane)
    # A fresh green context of each size after the work.
    backend = get_backend("green")
    for split in SPLITS:
        try:
            fresh = backend.open(split, verify=False)
            for lane in fresh.lanes.values():
                report["lanes"][f"recreated {split.key}:{lane.name}"] = v.lane(lane)
        except Exception as exc:
            report["lanes"][f"recreated {split.key}"] = f"error: {exc}"
    for name, row in report["lanes"].items():
        print(name, json.dumps(row))
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, f"green-cause-{mode}.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
