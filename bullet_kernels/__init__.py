"""bullet_kernels: run LLM prefill and decode at the same time on one GPU, each on its own SMs."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: F401
    BulletError,
    CaptureError,
    ClosedError,
    InvalidSplitError,
    NoGPUError,
    PartitionVerificationError,
    UnsupportedError,
)
from .partition import Partitioner, PartitionSet, SMSplit  # noqa: F401
