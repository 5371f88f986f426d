"""Green lanes and Inductor work in one process (docs/green-contexts.md), each scenario in a
fresh process because the failure depends on what the process did before."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
CHECKS = Path(__file__).parent / "fresh_process" / "green_cross_lane_checks.py"


def _run(scenario: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "gpu", str(CHECKS)]
    env = {**os.environ, "BULLET_SCENARIO": scenario}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=CHECKS.parents[1], timeout=900)
    print(done.stdout[-6000:])  # what each lane and retry showed: the record the docs cite (pytest -s)
    return done


def test_splits_opened_up_front_hold_through_inductor_work():
    done = _run("upfront")
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-3000:]


def test_splits_opened_late_are_verified_or_refused_never_misplaced():
    """The driver behaviour we work around: verification must catch it (never run misplaced);
    a refused set is made again, and only a verified one is used."""
    done = _run("late")
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-3000:]


def test_splits_released_after_their_work_verify_at_once():
    """The fix for moving from split to split: release the used set before opening the next
    (docs/green-contexts.md, "The cause")."""
    done = _run("released")
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-3000:]
