"""Does a green split opened after another one get the SMs it was granted? A diagnostic.

Seen once in the compile benchmark: with prefill=96,decode=36 open and used, prefill=104,decode=28
verified its 104-SM prefill lane running on the 96 SMs of the first split's prefill lane
(verification refused it). Each scenario runs in a fresh process (fresh, after eager work, after
a graph capture on the first split) and prints what the %smid probe saw on every lane. On the
H100 every lane held (bench/results/green-diagnose-h100-20261125.log), so the failure needs more
than a second split opened after the first.

    python3 bench/investigations/green_diagnose.py
"""

import subprocess
import sys

SCENARIO = r"""
import sys, torch
from bullet_kernels.partition import Partitioner, SMSplit, probe
mode = sys.argv[1]
sms = torch.cuda.get_device_properties(0).multi_processor_count
parts = Partitioner("green", verify=False)
a = parts.get(SMSplit(prefill=96, decode=36))
lane = a.lane("prefill")
x = torch.randn(4096, 4096, device="cuda")
if mode in ("work", "graph"):
    with a.use("prefill"):
        y = x @ x
if mode == "graph":
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=lane.stream):
        y = x @ x
    g.replay()
torch.cuda.synchronize()
b = parts.get(SMSplit(prefill=104, decode=28))
for pset in (a, b):
    for l in pset.lanes.values():
        seen = probe.observed_sms(l.stream, sms)
        print(f"{mode:6s} {pset.split.key:22s} {l.name:8s} granted {l.granted:4d} observed {len(seen):4d}")
"""

if __name__ == "__main__":
    for mode in ("fresh", "work", "graph"):
        out = subprocess.run([sys.executable, "-c", SCENARIO, mode], capture_output=True, text=True, timeout=120)
        print(out.stdout.strip() or out.stderr.strip()[-1500:])
