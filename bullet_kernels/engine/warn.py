"""One warn-once helper for the whole library: a fallback is said once per reason, not per step."""

from __future__ import annotations

import threading
import warnings

_said: set[str] = set()
_lock = threading.Lock()


def warn_once(message: str, stacklevel: int = 3) -> bool:
    """Warn ``message`` (a RuntimeWarning) unless it was said before; True when it was said now."""
    with _lock:
        if message in _said:
            return False
        _said.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
    return True


def forget_warnings() -> None:
    """Let every message be said again (tests that check a warning appears)."""
    with _lock:
        _said.clear()
