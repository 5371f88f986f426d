"""Reference model runner: a LlamaModel over a PagedKVCache, eager or captured by a graph bank."""

from __future__ import annotations

from .runner import ContextTooLong, ModelRunner, Request

__all__ = ["ContextTooLong", "ModelRunner", "Request"]
