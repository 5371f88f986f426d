"""python/ is an installable package, bullet_sglang, depending on bullet_kernels; importing it never imports SGLang."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


def test_bullet_sglang_is_installed_and_importable():
    import bullet_sglang

    assert importlib.metadata.version("bullet_sglang") == bullet_sglang.__version__
    requires = importlib.metadata.requires("bullet_sglang") or []
    assert any(r.split(">")[0].split("=")[0].strip() == "bullet_kernels" for r in requires), requires
    assert "docs/sglang-adapter.md" in bullet_sglang.__doc__  # where its status and measurements are


def test_importing_the_package_needs_no_sglang():
    # A fresh interpreter: the package must import on machines without SGLang (CI, the GPU image).
    code = ("import sys, bullet_sglang, bullet_sglang.options, bullet_sglang.hooks, bullet_sglang.version, "
            "bullet_sglang.launch_server; print('sglang' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_package_metadata_pins_the_sglang_it_targets():
    requires = importlib.metadata.requires("bullet_sglang") or []
    assert 'sglang==0.5.15; extra == "sglang"' in requires, requires
