"""bullet_sglang's launcher checks (CPU): its options, the SGLang setups it refuses before
anything starts, the SGLang version, and SGLang's extension points checked against the real
sglang 0.5.15 source (the wheel `scripts/install.sh` downloads)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bullet_sglang.hooks import HOOK_POINTS, HookPoint, check_hook_points
from bullet_sglang.options import BulletOptions, UnsupportedSetup, check_supported, split_argv
from bullet_sglang.version import UnsupportedSGLang, check_sglang_version

WHEELS = Path(__file__).resolve().parents[1] / ".cache" / "sglang"


def test_our_options_are_split_from_sglangs():
    opts, rest = split_argv(["--model-path", "m", "--enable-bullet", "--bullet-tpot-slo-ms", "12",
                             "--bullet-partition=tpc", "--port", "30000"])
    assert opts == BulletOptions(enable=True, tpot_slo_ms=12.0, partition="tpc")
    assert rest == ["--model-path", "m", "--port", "30000"]
    assert BulletOptions.from_env({"BULLET_SGLANG_CONFIG": opts.to_env()}) == opts
    assert BulletOptions.from_env({}) is None
    assert split_argv(["--model-path", "m"]) == (BulletOptions(), ["--model-path", "m"])


@pytest.mark.parametrize("argv,words", [
    (["--bullet-tpot-slo-ms", "10"], "needs --enable-bullet"),
    (["--enable-bullet", "--bullet-partition", "mps"], "green, tpc"),
    (["--enable-bullet", "--bullet-ttft-slo-ms", "0"], "must be > 0"),
])
def test_bad_bullet_options_are_refused(argv, words):
    with pytest.raises(UnsupportedSetup, match=words):
        split_argv(argv)


@pytest.mark.parametrize("sglang_argv,words", [
    (["--tp-size", "2"], "tensor parallel size 1"),
    (["--tp=4"], "tensor parallel size 1"),
    (["--dp-size", "2"], "--dp-size 1"),
    (["--speculative-algorithm", "EAGLE"], "speculative decoding"),
    (["--disaggregation-mode", "prefill"], "PD disaggregation"),
    (["--enable-pdmux"], "give one of them"),
])
def test_incompatible_sglang_options_are_refused_with_bullet_only(sglang_argv, words):
    with pytest.raises(UnsupportedSetup, match=words):
        check_supported(BulletOptions(enable=True), sglang_argv)
    check_supported(BulletOptions(enable=False), sglang_argv)  # unmodified SGLang: its own business
    check_supported(BulletOptions(enable=True), ["--tp-size", "1", "--disaggregation-mode", "null"])


def test_sglang_version_is_checked(monkeypatch):
    assert check_sglang_version("0.5.15") == "0.5.15"
    with pytest.raises(UnsupportedSGLang, match="sglang 0.5.21 is installed.*0.5.15"):
        check_sglang_version("0.5.21")
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(UnsupportedSGLang, match="not installed"):
        check_sglang_version()


def test_the_launcher_refuses_before_importing_sglang():
    code = ("import sys; from bullet_sglang import launch_server as l; "
            "rc = l.main(['--model-path', 'm', '--enable-bullet', '--tp-size', '2']); "
            "print(rc, 'sglang' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "False"]
    assert "tensor parallel size 1" in out.stderr


def write(root: Path, rel: str, text: str) -> None:
    f = root / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)


def test_hook_checks_catch_moved_changed_and_missing_points(tmp_path):
    write(tmp_path, "sglang/a.py", "class S:\n    def run(self, batch, extra):\n        pass\n    MODE = 1\n"
                                   "def entry(x, *args, flag=False, **kw):\n    pass\n")
    points = [HookPoint("sglang/a.py", "S.run", ("self", "batch"), "w1"), HookPoint("sglang/a.py", "S.gone", ("self",), "w2"),
              HookPoint("sglang/a.py", "entry", ("x", "args", "flag", "kw"), "w3"), HookPoint("sglang/a.py", "S.MODE", None, "w4"),
              HookPoint("sglang/b.py", "f", (), "w5"), HookPoint("sglang/a.py", "S.MODE", ("self",), "w6")]
    problems = check_hook_points(tmp_path, points)
    assert len(problems) == 4, problems
    assert "S.run takes (self, batch, extra), we rely on (self, batch) (w1)" in problems[0]
    assert "S.gone is missing (w2)" in problems[1]
    assert "sglang/b.py is missing" in problems[2]
    assert "S.MODE is no longer a function (w6)" in problems[3]


def test_every_hook_point_holds_in_the_real_sglang_0_5_15(tmp_path):
    wheels = sorted(WHEELS.glob("sglang-0.5.15-*.whl"))
    assert wheels, f"no sglang 0.5.15 wheel in {WHEELS}: scripts/install.sh downloads it (pip download --no-deps)"
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(tmp_path, [n for n in z.namelist() if n.startswith("sglang/") and n.endswith(".py")])
    assert check_hook_points(tmp_path) == []
    assert len(HOOK_POINTS) >= 15
