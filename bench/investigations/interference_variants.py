"""Does anything lower the co-run interference? One quick profile per variant, compared (#11).

Each variant is the quick profile (``bullet profile --quick --fresh``: the co-run of a 4096-token
prefill layer group beside a batch-128 decode step at 2048 context on every candidate split,
with both alone times) measured in a fresh process under some environment, then its co-run table
(:mod:`bullet_kernels.orchestrate.interference`):

- ``baseline``: the engine as it ships (cuBLAS GEMMs sized by cuBLAS for the whole GPU);
- ``cublaslt-target``: every GEMM through cuBLASLt told the lane's SM count
  (``BULLET_LINEAR=cublaslt-target``): kernels chosen for the lane, not the GPU, so fewer
  partial waves on both lanes;
- ``triton-gemm``: our split-K Triton GEMM sized for the lane (``BULLET_LINEAR=triton``).

    python3 bench/investigations/interference_variants.py [VARIANT...]

Writes ``$OUT/profile-<variant>.json`` (default: the current folder) and prints, per variant and
split, each lane's median slowdown and the work rate.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bullet_kernels.orchestrate import interference
from bullet_kernels.orchestrate.profile import Profile

VARIANTS = {
    "baseline": {},
    "cublaslt-target": {"BULLET_LINEAR": "cublaslt-target"},
    "triton-gemm": {"BULLET_LINEAR": "triton"},
}


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variant(s) {unknown}; variants: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT", "."))
    for name in names or list(VARIANTS):
        path = out / f"profile-{name}.json"
        env = {**os.environ, **VARIANTS[name]}
        done = subprocess.run([sys.executable, "-m", "bullet_kernels.cli", "profile", "--quick", "--fresh",
                               "--out", str(path)], env=env)
        if done.returncode != 0:
            print(f"{name}: bullet profile failed with exit status {done.returncode}", flush=True)
            continue
        for split, s in interference.summary(interference.interference_rows(Profile.load(path))).items():
            print(f"{name} {split}: slowdown prefill {s['prefill_slowdown_median']:.2f}x, decode "
                  f"{s['decode_slowdown_median']:.2f}x, work rate {s['work_rate_median']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
