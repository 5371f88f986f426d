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
from .compile.lanes import on_lane, set_default_split  # noqa: F401, E402


def _register_compile_backend() -> None:
    # Installed packages are found through the torch_dynamo_backends entry point, which dynamo
    # loads itself (registering here too would make its lookup fail as a duplicate); a source
    # checkout on sys.path has no entry point, so register directly.
    from importlib.metadata import entry_points

    if "bullet" in entry_points(group="torch_dynamo_backends").names:
        return
    try:
        from .compile.backend import register
    except ImportError:  # torch without dynamo
        return
    register()


_register_compile_backend()
