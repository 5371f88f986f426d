"""Process-wide fact shared by the green and tpc backends: is the tpc launch hook installed?

Once any launch callback is subscribed, the driver refuses to create green contexts in the
process, also after the callback is disabled again (measured on the H100, driver 580:
docs/tpc-masks.md). Only the tpc backend's hook fallback installs it, and a subscription
cannot be undone, so this flag only ever goes from False to True. The stream-record
mechanism subscribes nothing and leaves it False.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_installed = False


def hook_installed() -> bool:
    """Whether this process has subscribed the tpc launch hook."""
    return _installed


def mark_hook_installed() -> None:
    """Record that the launch hook is now subscribed (called right after it succeeded)."""
    global _installed
    with _lock:
        _installed = True
