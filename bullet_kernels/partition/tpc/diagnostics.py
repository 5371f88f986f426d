"""Diagnostic-only TPC-mask tools: for tests and investigations, not for serving.

Nothing in the request path uses these. They expose the launch hook's descriptor bits
directly (a next-launch mask), its counters, and switching the callback off, which is how
the measured facts in docs/tpc-masks.md were checked. Each call that needs the hook
installs it, and from then on this process cannot create green contexts.
"""

from __future__ import annotations

import contextlib

from ...errors import InvalidSplitError
from . import TpcBackend, native
from .masks import TpcMap, TpcMask


def descriptor_map(backend: TpcBackend) -> TpcMap:
    """Which SMs each launch-descriptor bit (the hook's numbering) reaches on this GPU."""
    return backend.tpc_map("hook")


@contextlib.contextmanager
def next_launch_mask(backend: TpcBackend, mask: TpcMask):
    """The next kernel launched from this thread inside the block runs on ``mask`` (descriptor
    bits) only; an unconsumed mask is cancelled on exit."""
    live = descriptor_map(backend).live
    if not mask & live:
        raise InvalidSplitError(
            f"{mask!r} enables no live TPC, so a kernel launched with it would never finish; "
            f"live descriptor TPC bits: {live}"
        )
    lib = backend.install_hook()
    lib.set_next_mask(mask.disabled_words())
    try:
        yield
    finally:
        lib.set_next_mask(None)


def hook_stats() -> dict:
    """The launch hook's counters: calls, writes, skips, last params size and QMD version,
    installed, thread_writes."""
    return native.load().hook_stats()


def reset_hook_stats() -> None:
    native.load().hook_reset_stats()


def set_hook_enabled(on: bool) -> None:
    """Turn the installed callback off or on; the subscription (and its effect on green
    contexts) stays."""
    native.load().hook_enable(on)
