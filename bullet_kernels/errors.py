"""Errors raised by bullet_kernels. Each message says what was wrong and what is allowed."""


class BulletError(RuntimeError):
    """Base class of every error this library raises on purpose."""


class NoGPUError(BulletError):
    """No CUDA GPU or no CUDA driver is usable in this process."""


class UnsupportedError(BulletError):
    """The GPU, driver or installation cannot do what was asked (e.g. no green contexts)."""


class InvalidSplitError(BulletError, ValueError):
    """An SM split that cannot be granted: bad counts, over-subscription, misalignment."""


class PartitionVerificationError(BulletError):
    """The start-up probe saw kernels escape their partition, or disjoint partitions overlap.

    ``undercount_only``: every problem was a lane running on fewer SMs than it was granted and
    none outside them (the green failure of docs/green-contexts.md), not an escape or overlap."""

    def __init__(self, message: str, undercount_only: bool = False):
        super().__init__(message)
        self.undercount_only = undercount_only


class ClosedError(BulletError):
    """A partition set or graph bank was used after close(), or closed twice."""


class CaptureError(BulletError):
    """A CUDA graph could not be captured."""


class NoBucketError(BulletError, ValueError):
    """A shape larger than every captured graph bucket."""
