"""Shared test helpers (the ``gpu`` skip lives in the repository's root conftest.py)."""

from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``|actual - expected| / |expected|`` over the whole tensor, in fp64."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())
