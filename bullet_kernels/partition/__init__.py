"""SM partitions: one interface, three backends (``green`` default, ``tpc``, ``none``).

>>> from bullet_kernels.partition import SMSplit, Partitioner
>>> parts = Partitioner("green").get(SMSplit(prefill=96, decode=36))   # verified on open
>>> with parts.use("decode"):
...     y = model(x)                                                    # runs on 36 SMs
"""

from __future__ import annotations

import threading

from ..device import DeviceInfo, describe_state
from ..errors import ClosedError, UnsupportedError
from .base import Backend, Lane, PartitionSet
from .config import SMSplit, grant_green, grant_tpc

BACKENDS = ("green", "tpc", "none")
DEFAULT_BACKEND = "green"


def backend_class(name: str) -> type[Backend]:
    if name == "green":
        from .green import GreenBackend

        return GreenBackend
    if name == "tpc":
        from .tpc import TpcBackend

        return TpcBackend
    if name == "none":
        from .none import NoneBackend

        return NoneBackend
    raise UnsupportedError(f"unknown partition backend {name!r}; choose one of {', '.join(BACKENDS)}")


def available_backends(device: DeviceInfo | None) -> dict[str, str]:
    """``{backend: reason it cannot run here, or ""}``."""
    out = {}
    for name in BACKENDS:
        try:
            out[name] = backend_class(name).unavailable_reason(device)
        except Exception as exc:  # a backend whose module cannot even load
            out[name] = f"cannot load: {exc}"
    return out


def get_backend(name: str = DEFAULT_BACKEND, device_index: int = 0) -> Backend:
    device, why = describe_state(device_index)
    cls = backend_class(name)
    reason = cls.unavailable_reason(device)
    if reason:
        usable = [n for n, r in available_backends(device).items() if not r]
        raise UnsupportedError(
            f"partition backend {name!r} is unavailable: {reason}"
            + (f" ({why})" if why and why not in reason else "")
            + f"; usable here: {', '.join(usable) or 'none'}"
        )
    return cls(device)


class Partitioner:
    """Opens one verified PartitionSet per SMSplit on one GPU and keeps it until close()."""

    def __init__(self, backend: str = DEFAULT_BACKEND, device_index: int = 0, verify: bool = True):
        self.backend = get_backend(backend, device_index)
        self.verify = verify
        self._sets: dict[SMSplit, PartitionSet] = {}
        self._lock = threading.Lock()
        self._closed = False

    @property
    def device(self) -> DeviceInfo | None:
        return self.backend.device

    def grant(self, split: SMSplit) -> dict[str, int]:
        return self.backend.grant(split)

    def get(self, split: SMSplit) -> PartitionSet:
        with self._lock:
            if self._closed:
                raise ClosedError("this Partitioner was closed; create a new one")
            pset = self._sets.get(split)
            if pset is None:
                pset = self._sets[split] = self.backend.open(split, verify=self.verify)
            return pset

    def open_sets(self) -> list[PartitionSet]:
        return list(self._sets.values())

    def release(self, split: SMSplit) -> None:
        """Close one split's set now; a later ``get`` opens a fresh one. The whole device is
        synchronized first: a graph captured on the set's lanes may be replaying on any stream.

        Why: on driver 580 a launch on a green lane may leave out the SMs it shares with a lane
        of another open set that has run work (docs/green-contexts.md: a growing lane opened
        beside a used set lost those SMs on 16% of probes; with the used set closed first, on
        none). A program that moves from one split to the next for good should release the old
        one. Graphs captured on the released set must not be replayed again: drop them first,
        for every lane of the split (``ModelRunner.release_graphs(placement)`` drops the graphs
        whose home lane or GEMM lane it is; or ``GraphBank.release``)."""
        with self._lock:
            if self._closed:
                raise ClosedError("this Partitioner was closed; create a new one")
            pset = self._sets.pop(split, None)
            if pset is None:
                open_now = ", ".join(s.key for s in self._sets) or "none"
                raise KeyError(f"split {split.key} is not open in this Partitioner; open: {open_now}")
            if not pset.closed:
                if self.device is not None:
                    import torch

                    torch.cuda.synchronize(self.device.index)
                pset.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                raise ClosedError("this Partitioner was already closed; close it once")
            self._closed = True
            for pset in self._sets.values():
                if not pset.closed:
                    pset.close()
            self._sets.clear()

    def __enter__(self) -> "Partitioner":
        return self

    def __exit__(self, *exc) -> None:
        if not self._closed:
            self.close()


__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "Backend",
    "Lane",
    "PartitionSet",
    "Partitioner",
    "SMSplit",
    "available_backends",
    "backend_class",
    "get_backend",
    "grant_green",
    "grant_tpc",
]
