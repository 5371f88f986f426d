"""The lane stress test of issue #10 on both backends, each in a fresh process (green contexts
cannot be created once a tpc launch hook is installed; and what a process did before is part of
what is tested). See tests/fresh_process/lane_stress_checks.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
CHECKS = Path(__file__).parent / "fresh_process" / "lane_stress_checks.py"


@pytest.mark.parametrize("backend", ["green", "tpc"])
def test_lane_stress(backend):
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "gpu", str(CHECKS)]
    env = {**os.environ, "BULLET_STRESS_BACKEND": backend}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=CHECKS.parents[1], timeout=900)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-3000:]
