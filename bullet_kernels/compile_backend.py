"""``torch.compile(model, backend="bullet")``: Inductor code, one CUDA graph per SM configuration.

The FX graph is compiled by Inductor with Inductor's own CUDA graphs off; we then capture the
compiled function lazily per (input shapes, SM split, lane) on that lane's partition stream,
because a graph keeps the SM restriction it was captured with. Which split/lane: the one
selected with :func:`bullet_kernels.on_lane`; none selected means the whole GPU.

Inputs: parameters and buffers (dynamo marks them) are used in place; other tensor inputs are
copied into static buffers before each replay. Outputs are the graph's static tensors: valid
until the next call of the same compiled function on the same lane (clone to keep them), the
same contract as PyTorch's cudagraph trees.

Honest fallbacks, each warned once with the reason: no GPU (compiled code runs without graphs),
graphs that cannot be captured (CPU tensors, dynamic shapes, input mutation, a failed capture).
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Any, Sequence

import torch

from . import lanes

_warned: set[str] = set()
_warn_lock = threading.Lock()


def warn_once(reason: str) -> None:
    with _warn_lock:
        if reason in _warned:
            return
        _warned.add(reason)
    warnings.warn(f"bullet backend: {reason}", RuntimeWarning, stacklevel=3)


def _is_static_address(x: Any) -> bool:
    """Parameters and buffers: their storage never moves between calls, so no copy is needed."""
    return isinstance(x, torch.nn.Parameter) or getattr(x, "_dynamo_static_input_type", None) is not None


_INPLACE_SUFFIX = "_"


def why_not_capturable(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> str:
    """Reason this graph cannot be a CUDA graph, or ``""`` (after PyTorch's cudagraphs checks)."""
    if not torch.cuda.is_available():
        return "no GPU: running the Inductor-compiled code without CUDA graphs"
    for i, x in enumerate(example_inputs):
        if isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in x.shape)):
            return f"input {i} has a dynamic shape; compile with dynamic=False so each shape gets its own graph"
        if isinstance(x, torch.Tensor) and x.device.type != "cuda":
            return f"input {i} is on {x.device}; CUDA graphs need every tensor on the GPU"
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
    for node in gm.graph.nodes:
        target = getattr(node.target, "__name__", str(node.target))
        mutates = (node.op == "call_method" and target.endswith(_INPLACE_SUFFIX) and not target.startswith("_")) or (
            node.op == "call_function" and "out" in node.kwargs
        )
        if mutates and node.args and node.args[0] in placeholders:
            return f"the graph mutates input {node.args[0].name} in place ({target}); graphs would replay stale copies"
        if "device" in node.kwargs and torch.device(node.kwargs["device"]).type == "cpu":
            return f"node {node.name} creates a CPU tensor; CUDA graphs need every op on the GPU"
    return ""


class _LaneGraph:
    """One captured replay of the compiled function for one input signature and lane."""

    def __init__(self, compiled, args: Sequence[Any], stream: torch.cuda.Stream, sm_budget: int, pool):
        from .graph_bank import capture_on_stream

        self.static_inputs = [
            a if not isinstance(a, torch.Tensor) or _is_static_address(a) else a.clone() for a in args
        ]
        self.copy_idx = [
            i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and not _is_static_address(a)
        ]
        self.graph, self.outputs = capture_on_stream(lambda: compiled(*self.static_inputs), stream, sm_budget, pool)

    def __call__(self, args: Sequence[Any]):
        for i in self.copy_idx:
            src, dst = args[i], self.static_inputs[i]
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)
        self.graph.replay()
        return self.outputs


class BulletCompiled:
    """The callable torch.compile gets back from the backend."""

    instances: "weakref.WeakSet[BulletCompiled]" = weakref.WeakSet()  # for inspection and tests

    def __init__(self, compiled, reason_no_graphs: str):
        self.compiled = compiled
        self.reason_no_graphs = reason_no_graphs
        self.graphs: dict[tuple, _LaneGraph] = {}
        self.pools: dict[str, Any] = {}
        self._whole_stream = None
        BulletCompiled.instances.add(self)

    def _signature(self, args) -> tuple:
        return tuple(
            (tuple(a.shape), a.dtype, a.stride()) if isinstance(a, torch.Tensor) else a for a in args
        )

    def __call__(self, *args):
        if self.reason_no_graphs:
            return self.compiled(*args)
        sel = lanes.current()
        if sel is None:
            where, stream, budget = ("whole-gpu", "main"), None, torch.cuda.get_device_properties(0).multi_processor_count
        else:
            lane = sel.pset.lane(sel.lane)
            where, stream, budget = (sel.split, sel.lane), lane.stream, lane.granted
        key = (self._signature(args), *where)
        graph = self.graphs.get(key)
        if graph is None:
            try:
                if stream is None:  # one whole-GPU stream: warm-up memory is cached per stream
                    self._whole_stream = self._whole_stream or torch.cuda.Stream()
                capture_stream = stream if stream is not None else self._whole_stream
                pool = self.pools.setdefault(where[1], torch.cuda.graph_pool_handle())
                graph = self.graphs[key] = _LaneGraph(self.compiled, args, capture_stream, budget, pool)
            except Exception as exc:  # capture failed: keep working, without graphs
                self.reason_no_graphs = f"CUDA graph capture failed ({type(exc).__name__}: {exc}); running without graphs"
                warn_once(self.reason_no_graphs)
                return self.compiled(*args)
        return graph(args)


def bullet_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """The dynamo backend registered as ``"bullet"``."""
    from torch._inductor.compile_fx import compile_fx

    reason = why_not_capturable(gm, example_inputs)
    compiled = compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": False})
    if reason:
        warn_once(reason)
    return BulletCompiled(compiled, reason)


def register() -> None:
    """Register under the name ``bullet`` (the entry point does this without an import too)."""
    from torch._dynamo.backends import registry

    if "bullet" not in registry._COMPILER_FNS:
        registry.register_backend(bullet_backend, name="bullet")
