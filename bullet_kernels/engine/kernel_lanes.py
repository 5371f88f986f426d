"""Kernel-level placement: a decode graph whose GEMMs run on another, wider lane (the GEMM lane).

At batch 128 a decode step's GEMMs are compute-bound on a 32-48-SM lane while its attention is
bandwidth-bound, so the GEMMs may gain from more SMs than the rest of the step. One graph keeps
its home lane (the key's own lane: attention, norms, rotary) and forks every GEMM
(``kernels.linear``: qkv, o_proj, gate_up, down, lm_head) to the GEMM lane's stream inside the
same capture, then joins back (docs/kernel-placement.md):

    gemm_stream.wait_stream(home)          # an event recorded in the capture pulls the GEMM
    with stream(gemm_stream), sm_budget(gemm_sms):   # lane's stream into the same capture
        out = gemm()
    home.wait_stream(gemm_stream)          # and the join brings it back before the next kernel

Each kernel node keeps the SMs of the stream it was captured on (green contexts; tpc record
lanes), so the GEMMs of the replayed graph run on the GEMM lane and the rest on the home lane.
The strict fork/join also keeps memory safe without ``record_stream``: a GEMM's input (home
stream) is read only between a fork and a join, and its output (GEMM stream) is used by the
home stream only after the join, so no block is reused while the other stream may still use it.

:func:`check_gemm_lane` is the pure rule for which keys may carry a GEMM lane (CPU-tested);
:class:`GemmFork` is the runner handed to :func:`bullet_kernels.kernels.gemms_through`;
:func:`backend_refusal` says why a backend's lanes cannot carry per-kernel placement.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from ..kernels import gemms_through
from ..kernels.sizing import sm_budget
from .placement import Placement

PLACED_PHASES = ("decode",)  # prefill GEMMs are not compute-bound on a small lane in the same way


def check_gemm_lane(phase: str, home: Placement, gemm_lane: Placement | None) -> None:
    """Raise ValueError unless a graph of ``phase`` on ``home`` may run its GEMMs on ``gemm_lane``."""
    if gemm_lane is None:
        return
    if not isinstance(gemm_lane, Placement):
        raise TypeError(f"gemm_lane must be a Placement (a lane of a split, or Placement.WHOLE_GPU), got {gemm_lane!r}")
    if phase not in PLACED_PHASES:
        raise ValueError(
            f"kernel-level placement (gemm_lane={gemm_lane}) is for {', '.join(PLACED_PHASES)} graphs only, "
            f"not {phase}: prefill GEMMs already fill their lane; capture prefill without gemm_lane"
        )
    if home.whole_gpu:
        raise ValueError(
            f"a whole-GPU graph already runs its GEMMs on every SM; gemm_lane={gemm_lane} needs a home lane "
            "of a split, e.g. Placement(SMSplit(prefill=100, decode=32), 'decode')"
        )
    if gemm_lane == home:
        raise ValueError(
            f"gemm_lane {gemm_lane} is the graph's own lane: that is the plain graph, pass gemm_lane=None "
            "(or name a wider lane of another split, or Placement.WHOLE_GPU)"
        )


def backend_refusal(backend: str, needs_scope: bool) -> str:
    """Why lanes of ``backend`` cannot carry kernel-level placement ("" where they can).

    Green lanes and tpc *record* lanes carry their SMs on the stream, and a kernel node keeps
    the SMs of the stream it was captured on, so forking to another lane's stream places each
    kernel. tpc *hook* lanes (``needs_scope``) are masked by the launching thread when the
    graph's executable is uploaded: one mask for the whole graph, whatever stream a kernel
    was captured on, so the GEMMs would silently stay on the home lane.
    """
    if backend == "tpc" and needs_scope:
        return (
            "the tpc backend's launch-hook lanes write one TPC mask into a whole graph when its "
            "executable is uploaded (the hook sees the launching thread, not the stream), so GEMMs "
            "forked to another lane's stream would keep the home lane's mask. Use backend='green' "
            "(or tpc with the stream-record mechanism, BULLET_TPC_MECHANISM=record) for kernel "
            "placement, or a plain placement on the hook"
        )
    return ""


class GemmFork:
    """``runner(gemm)`` for :func:`~bullet_kernels.kernels.gemms_through`: run each GEMM on
    ``stream`` under ``sm_budget(sms)``, forked from and joined back to the current stream.

    Works eagerly and inside a capture (where the fork pulls ``stream`` into the capture and
    the join ends its part before the capture ends). ``current_stream`` and ``use_stream``
    default to torch's; tests pass fakes to check the ordering without a GPU.
    """

    def __init__(self, stream, sms: int, *, current_stream: Callable[[], Any] | None = None,
                 use_stream: Callable[[Any], Any] | None = None):
        if sms < 1:
            raise ValueError(f"the GEMM lane needs at least one SM, got {sms}")
        self.stream, self.sms = stream, sms
        self._current = current_stream or _torch_current_stream
        self._use = use_stream or _torch_use_stream
        self.calls = 0  # GEMMs forked so far (a capture that forks none placed nothing)

    def __call__(self, gemm: Callable[[], Any]) -> Any:
        home = self._current()
        self.stream.wait_stream(home)  # fork: the GEMM's inputs are ready
        with self._use(self.stream), sm_budget(self.sms):  # cuBLASLt's SM target reads this budget
            out = gemm()
        home.wait_stream(self.stream)  # join: the home lane's next kernel sees the result
        self.calls += 1
        return out


def _torch_current_stream():
    import torch

    return torch.cuda.current_stream()


def _torch_use_stream(stream):
    import torch

    return torch.cuda.stream(stream)


@contextlib.contextmanager
def gemms_on(fork: GemmFork | None):
    """Every ``kernels.linear`` inside runs through ``fork`` (None: on the current stream)."""
    if fork is None:
        yield
        return
    with gemms_through(fork):
        yield
