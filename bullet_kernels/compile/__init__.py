"""``torch.compile(model, backend="bullet")`` and the lane selection it captures for.

``lanes``: :func:`on_lane` / :func:`set_default_split` choose the SM split and lane the current
code runs on; ``backend``: the dynamo backend, which captures one graph per selection through
the engine's GraphBank (imported on demand: it needs torch's compiler stack).
"""

from __future__ import annotations

from .lanes import LaneSelection, current, default_partitioner, on_lane, set_default_split

__all__ = ["LaneSelection", "current", "default_partitioner", "on_lane", "set_default_split"]
