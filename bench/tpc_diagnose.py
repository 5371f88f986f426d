"""Which TPC-mask mechanism holds on this GPU and driver? A diagnostic, not a benchmark.

On the H100 (driver 580.159.04) the stream-mask record at the table offset 0x51c of a stream
from cuStreamCreate held stale bytes, and masks written there restricted nothing (the tpc GPU
tests found every SM reached by no mask bit). This script asks, on throwaway streams of its
own process, restoring every record it touches:
1. what the record holds on fresh streams from cuStreamCreate and from torch's pool;
2. whether a mask written there restricts the %smid probe, for each kind of stream;
3. whether the launch hook's next-launch mask restricts the probe, with the hook's counters.

    python bench/tpc_diagnose.py            # prints a report; writes bench/results/tpc-diagnose-<gpu>-<date>.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bullet_kernels import results  # noqa: E402
from bullet_kernels.device import query  # noqa: E402
from bullet_kernels.partition import probe, tpc_native  # noqa: E402
from bullet_kernels.partition.tpc import stream_offset  # noqa: E402
from bullet_kernels.partition.tpc_mask import TpcMask  # noqa: E402

EIGHT_TPCS = TpcMask.range(0, 8)  # logical TPCs 0..7: 16 SMs where bits are logical


def masked_probe(lib, handle: int, offset: int, sm_count: int) -> dict:
    before = lib.read_record(handle, offset)
    lib.set_stream_mask(handle, offset, EIGHT_TPCS.disabled_words())
    try:
        seen = probe.observed_sms(handle, sm_count, waves=2, spin_us=5)
    finally:
        lib.write_record(handle, offset, before)
    return {"record_before": [f"{w:#010x}" for w in before], "observed_sms": len(seen)}


def main() -> int:
    if not torch.cuda.is_available():
        print("tpc_diagnose: no GPU here")
        return 1
    d = query()
    lib = tpc_native.load()
    offset, why = stream_offset(lib, d.driver_api_version)
    if offset is None:
        print(f"tpc_diagnose: {why}")
        return 1
    rows = []

    class Rows(list):  # print each result as it comes: a crash in the driver must not hide them
        def append(self, row):
            super().append(row)
            print(row, flush=True)

    rows = Rows()
    print(f"offset {offset:#x} on driver {d.driver_api_version} ({d.kernel_driver})", flush=True)
    from bullet_kernels.partition.tpc import _create_stream, _destroy_stream

    # 1. read-only: the record on fresh streams of both kinds
    own = [_create_stream(d.index) for _ in range(3)]
    pooled = [torch.cuda.Stream() for _ in range(3)]
    for h, _ in own:
        rows.append({"test": "cuStreamCreate record", "record": [f"{w:#010x}" for w in lib.read_record(h, offset)], "observed_sms": None})
    for st in pooled:
        rows.append({"test": "torch pool stream record", "record": [f"{w:#010x}" for w in lib.read_record(st.cuda_stream, offset)], "observed_sms": None})
    # 2. a stream mask, only where the record reads empty (as the backend's guard demands)
    for kind, handle in (("cuStreamCreate", own[0][0]), ("torch pool", pooled[0].cuda_stream)):
        if lib.read_record(handle, offset) == [0, 0, 0, 0, 0]:
            rows.append({"test": f"{kind} stream, stream mask", **masked_probe(lib, handle, offset, d.sm_count)})
        else:
            rows.append({"test": f"{kind} stream, stream mask", "skipped": "record not empty", "observed_sms": None})
    # 3. the launch hook's next-launch mask (writes the launch descriptor, not the stream)
    lib.hook_install()
    lib.hook_reset_stats()
    out = torch.full((2 * d.sm_count,), -1, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    lib.set_next_mask(EIGHT_TPCS.disabled_words())
    probe.launch_probe(pooled[1].cuda_stream, out, spin_us=5)
    lib.set_next_mask(None)
    torch.cuda.synchronize()
    rows.append({"test": "launch hook, next-launch mask", "observed_sms": len(probe.sms_written(out)), "hook": lib.hook_stats()})
    for h, _ in own:
        _destroy_stream(d.index, h)
    path = results.write("tpc-diagnose", rows, {r["test"]: r["observed_sms"] for r in rows if r["observed_sms"] is not None}, offset=hex(offset),
                         expected_sms_if_mask_holds=16)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
