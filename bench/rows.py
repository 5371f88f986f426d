"""Result rows of the benchmark suite (bench helpers)."""

from __future__ import annotations


def select(items, /, **match) -> list[dict]:
    """Measured rows (not error records) whose fields equal ``match`` (any field, ``rows`` too)."""
    return [r for r in items if "error" not in r and all(r.get(k) == v for k, v in match.items())]
