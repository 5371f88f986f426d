"""``torch.compile(model, backend="bullet")``: Inductor code, one CUDA graph per SM configuration.

The FX graph is compiled by Inductor with Inductor's own CUDA graphs off; we then capture the
compiled function lazily per (input signature, SM split, lane) through a
:class:`~bullet_kernels.engine.GraphBank`, on that lane's partition stream, because a graph keeps
the SM restriction it was captured with. Which split/lane: the one selected with
:func:`bullet_kernels.on_lane`; none selected means the whole GPU.

Each compiled function owns its banks (one per Partitioner the selections came from), so its
graphs and pools go when torch drops the function (``torch._dynamo.reset()``, recompiles). The
pool is per (function, lane): a function's calls on one lane run one after another, so its
graphs share intermediates there; another function or lane never writes into its outputs.
Whole-GPU graphs use the process-wide whole-GPU stream like every other capture.

Inputs: parameters and buffers (dynamo marks them) are used in place; other tensor inputs are
copied into static buffers before each replay. Outputs are the graph's static tensors: valid
until the next call of the same compiled function on the same lane (clone to keep them), the
same contract as PyTorch's cudagraph trees.

Honest fallbacks, each warned once with the reason: no GPU (compiled code runs without graphs),
graphs that cannot be captured (CPU tensors, dynamic shapes, input mutation, a failed capture).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Sequence

import torch

from ..engine.graph_bank import GraphBank, GraphKey
from ..engine.graph_check import GraphVerificationError
from ..engine.placement import WHOLE_GPU_LANE
from ..engine.warn import warn_once
from ..errors import PartitionVerificationError
from . import lanes


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
        if node.op == "get_attr" and _is_cpu_tensor(_attribute(gm, str(node.target))):
            # Tracing runs factory calls with constant arguments once and stores the result.
            return f"constant {node.target} is a CPU tensor; CUDA graphs need every tensor on the GPU"
    return ""


def _attribute(gm: torch.fx.GraphModule, dotted: str) -> Any:
    value: Any = gm
    for part in dotted.split("."):
        value = getattr(value, part, None)
    return value


def _is_cpu_tensor(value: Any) -> bool:
    """A CPU tensor a graph cannot hold (0-dim CPU tensors act as scalars and are fine)."""
    return isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dim() > 0


class _StaticInputs:
    """The inputs one graph was captured on; :meth:`load` copies a call's inputs into them."""

    def __init__(self, args: Sequence[Any]):
        self.args = [a if not isinstance(a, torch.Tensor) or _is_static_address(a) else a.clone() for a in args]
        self.copy_idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and not _is_static_address(a)]

    def load(self, args: Sequence[Any]) -> None:
        for i in self.copy_idx:
            src, dst = args[i], self.args[i]
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)


class BulletCompiled:
    """The callable torch.compile gets back from the backend."""

    instances: "weakref.WeakSet[BulletCompiled]" = weakref.WeakSet()  # for inspection and tests
    _ids = itertools.count()

    def __init__(self, compiled, reason_no_graphs: str):
        self.compiled = compiled
        self.reason_no_graphs = reason_no_graphs
        self.phase = f"compiled:{next(BulletCompiled._ids)}"  # names its graphs in the banks
        self.banks: dict[Any, GraphBank] = {}  # Partitioner (None: whole GPU) -> bank
        self._inputs: dict[GraphKey, _StaticInputs] = {}
        BulletCompiled.instances.add(self)

    @property
    def graphs(self) -> list[GraphKey]:
        """Every graph captured for this function, over all its banks."""
        return [k for bank in self.banks.values() for k in bank.keys()]

    def _signature(self, args) -> tuple:
        return tuple(
            (tuple(a.shape), a.dtype, a.stride()) if isinstance(a, torch.Tensor) else a for a in args
        )

    def __call__(self, *args):
        if self.reason_no_graphs:
            return self.compiled(*args)
        sel = lanes.current()
        partitioner = None if sel is None else sel.partitioner
        split, lane = (None, WHOLE_GPU_LANE) if sel is None else (sel.split, sel.lane)
        key = GraphKey(self.phase, 0, split, lane, signature=self._signature(args))
        bank = self.banks.get(partitioner)
        if bank is None or key not in bank:
            try:
                if bank is None:
                    bank = self.banks[partitioner] = GraphBank(partitioner)
                inputs = self._inputs[key] = _StaticInputs(args)
                bank.capture(key, lambda: self.compiled(*inputs.args), pool_key=(self.phase, lane))
            except (GraphVerificationError, PartitionVerificationError):
                raise  # never fall back to running on SMs that were not the lane's
            except Exception as exc:  # capture failed: keep working, without graphs
                self.reason_no_graphs = f"CUDA graph capture failed ({type(exc).__name__}: {exc}); running without graphs"
                warn_once(f"bullet backend: {self.reason_no_graphs}")
                return self.compiled(*args)
        self._inputs[key].load(args)
        return bank.replay(key)


def bullet_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """The dynamo backend registered as ``"bullet"``."""
    from torch._inductor.compile_fx import compile_fx

    reason = why_not_capturable(gm, example_inputs)
    compiled = compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": False})
    if reason:
        warn_once(f"bullet backend: {reason}")
    return BulletCompiled(compiled, reason)


def register() -> None:
    """Register under the name ``bullet`` (the entry point does this without an import too)."""
    from torch._dynamo.backends import registry

    if "bullet" not in registry._COMPILER_FNS:
        registry.register_backend(bullet_backend, name="bullet")
