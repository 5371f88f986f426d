"""The adapter against the real sglang 0.5.15 (CPU): runs tests/sglang_real with the python of the
separate environment ``bash scripts/sglang_cpu_env.sh`` makes (.venv-sglang: Python 3.12, sglang
0.5.15 without its GPU-only dependencies, sglang's torch 2.11). Skipped where that environment
does not exist; .ci/run makes it before the test run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("SGLANG_VENV", ROOT / ".venv-sglang"))
if not VENV.is_absolute():
    VENV = ROOT / VENV
PYTHON = VENV / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(not PYTHON.exists(), reason=f"no SGLang environment at {VENV}: make it with "
                    "`bash scripts/sglang_cpu_env.sh` (about 2.7 GB to download, 3-4 minutes)")
def test_the_adapter_against_real_sglang_objects():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    out = subprocess.run([str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                          "tests/sglang_real"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, f"tests/sglang_real failed under {PYTHON}:\n{tail}"
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1], tail
