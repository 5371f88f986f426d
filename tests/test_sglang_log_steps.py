"""bench/investigations/sglang_log_steps.py on a small SGLang-style log (plain and .xz)."""

from __future__ import annotations

import lzma
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "investigations" / "sglang_log_steps.py"
LOG = """\
[2026-12-02 06:35:55] Decode batch, #running-req: 10, #token: 8239, token usage: 0.01, cuda graph: True, gen throughput (token/s): 1250.00, #queue-req: 0
[2026-12-02 06:35:56] Decode batch, #running-req: 12, #token: 9239, token usage: 0.01, cuda graph: True, gen throughput (token/s): 1000.00, #queue-req: 0
[2026-12-02 06:35:57] Decode batch, #running-req: 14, #token: 9239, token usage: 0.01, cuda graph: True, gen throughput (token/s): 1400.00, #queue-req: 0
[2026-12-02 06:35:58] Decode batch, #running-req: 4, #token: 2000, token usage: 0.00, cuda graph: True, gen throughput (token/s): 0.00, #queue-req: 0
[2026-12-02 06:35:55] bullet_sglang: stream group 3, (prefill, decode) SMs (68, 64); decode (10, 1100), prefill 995 tokens, 8 layer groups left; decode steps overlapped 108 of 131
[2026-12-02 06:35:56] bullet_sglang: stream group 5, (prefill, decode) SMs (0, 132); decode (16, 1122), prefill None tokens, 0 layer groups left; decode steps overlapped 119 of 175
[2026-12-02 06:36:41] bullet_sglang: decode steps measured minus profiled (ms) by decode SMs: {64: {'samples': 64, 'offset_ms': 2.468}}
"""


def test_step_times_groups_and_overlap_are_read_from_the_log(tmp_path):
    plain = tmp_path / "server.log"
    plain.write_text(LOG)
    packed = tmp_path / "server.log.xz"
    packed.write_bytes(lzma.compress(LOG.encode()))
    out = subprocess.run([sys.executable, str(SCRIPT), str(plain), str(packed)], capture_output=True, text=True,
                         check=True).stdout
    # windows of batch 10, 12, 14: 8.0, 12.0, 10.0 ms, median 10.0; the idle window (throughput 0) skipped
    assert out.count("batch 10-19: 10.0 (3)") == 2 and "batch 0-9" not in out
    assert "68/64 x1" in out and "0/132 x1" in out
    assert "decode steps overlapped: 119 of 175" in out and "{64: {'samples': 64, 'offset_ms': 2.468}}" in out
