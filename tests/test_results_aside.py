"""scripts/serving_goodput.sh results-aside / results-back: the committed results leave the
working tree for a device lease (its carry limit) and come back as they were, nothing lost."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "serving_goodput.sh"

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path):
    """A git checkout holding the script and three committed results (one of them edited since)."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "scripts" / SCRIPT.name)
    results = root / "bench" / "results"
    results.mkdir(parents=True)
    for name in ("a.json.xz", "b.png", "c.log", "keep.json"):
        (results / name).write_text(name)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results")
    (results / "c.log").write_text("edited, not committed")
    return root


def step(repo: Path, tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "RESULTS_ASIDE": str(tmp_path / "aside"), "SERVER_LOGS": str(tmp_path / "logs"),
           "OUT": str(tmp_path / "out")}
    return subprocess.run(["bash", "scripts/serving_goodput.sh", mode], cwd=repo, env=env, capture_output=True, text=True)


def test_results_go_aside_and_come_back_as_they_were(repo, tmp_path):
    results = repo / "bench" / "results"
    assert step(repo, tmp_path, "results-aside").returncode == 0
    assert sorted(p.name for p in results.iterdir()) == ["keep.json"]  # only .xz, .png and .log leave
    assert sorted(p.name for p in (tmp_path / "aside").iterdir()) == ["a.json.xz", "b.png", "c.log"]
    back = step(repo, tmp_path, "results-back")
    assert back.returncode == 0, back.stdout + back.stderr
    assert (results / "c.log").read_text() == "edited, not committed"  # moved back, not checked out
    assert git(repo, "status", "--short") == " M bench/results/c.log\n"
    assert not (tmp_path / "aside").exists()


def test_results_back_refuses_what_would_overwrite_or_is_not_there(repo, tmp_path):
    results = repo / "bench" / "results"
    nothing = step(repo, tmp_path, "results-back")
    assert nothing.returncode == 1 and f"no results set aside in {tmp_path / 'aside'}" in nothing.stdout
    assert step(repo, tmp_path, "results-aside").returncode == 0
    (results / "b.png").write_text("new")  # a file of the same name made meanwhile
    clash = step(repo, tmp_path, "results-back")
    assert clash.returncode == 1 and "1 files left in" in clash.stdout
    assert (results / "b.png").read_text() == "new" and (tmp_path / "aside" / "b.png").read_text() == "b.png"
    assert (results / "a.json.xz").read_text() == "a.json.xz"
