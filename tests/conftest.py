"""Shared test setup: tests marked ``gpu`` are skipped where no CUDA device is usable."""

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


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``|actual - expected| / |expected|`` over the whole tensor, in fp64."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())
