"""Shared by the tests (tests/) and the benchmark suite (bench/): anything marked ``gpu`` is
skipped where no CUDA device is usable, so both run cleanly on a machine without a GPU."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
