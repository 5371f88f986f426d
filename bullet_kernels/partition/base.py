"""The one small interface every partition backend implements.

A backend turns an :class:`SMSplit` into a :class:`PartitionSet`: one :class:`Lane` per named
phase, each with a torch-usable stream whose kernels run only on that lane's SMs. A
PartitionSet is verified by the ``%smid`` probe before anyone gets it (see verification.py).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from typing import Any, Callable, ClassVar

from ..device import DeviceInfo
from ..errors import ClosedError
from .config import SMSplit


@dataclasses.dataclass
class Lane:
    name: str
    asked: int
    granted: int
    stream: Any  # torch.cuda.Stream / ExternalStream; None on a machine without a GPU
    expected_sms: frozenset[int] | None = None  # known up front for tpc masks; None for green
    observed_sms: frozenset[int] = frozenset()
    whole_gpu: bool = False

    def row(self) -> dict:
        return {
            "lane": self.name,
            "asked": self.asked,
            "granted": self.granted,
            "observed": len(self.observed_sms),
            "sm_ids": format_ranges(sorted(self.observed_sms)),
        }


def format_ranges(ids: list[int]) -> str:
    """Sorted ids (SMs, TPC bits) as inclusive ranges: ``[0,1,2,5,6]`` -> ``"0-2,5-6"``."""
    out, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            out.append(f"{start}-{x}" if x != start else f"{x}")
            start = None
    return ",".join(out)


class PartitionSet:
    """The streams of one SM split. Use as a context manager or call :meth:`close` once."""

    def __init__(
        self,
        backend: str,
        split: SMSplit,
        device: DeviceInfo | None,
        lanes: dict[str, Lane],
        release: Callable[[], None] = lambda: None,
        disjoint: bool = True,
        scope: Callable[[str], Any] | None = None,
    ):
        self.backend = backend
        self.split = split
        self.device = device
        self._lanes = lanes
        self._release = release
        self.disjoint = disjoint
        self._scope = scope
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(
                f"partition set {self.split.key} ({self.backend}) was closed; open a new one"
            )

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def lanes(self) -> dict[str, Lane]:
        self._check_open()
        return self._lanes

    def lane(self, name: str) -> Lane:
        self._check_open()
        try:
            return self._lanes[name]
        except KeyError:
            raise KeyError(
                f"no lane {name!r} in split {self.split}; lanes: {', '.join(self._lanes)}"
            ) from None

    def stream(self, name: str):
        return self.lane(name).stream

    @property
    def needs_scope(self) -> bool:
        """True where the lane's stream alone does not restrict SMs: work must run inside
        :meth:`use` / :meth:`lane_scope` (only the tpc backend's launch-hook fallback)."""
        return self._scope is not None

    def lane_scope(self, name: str):
        """Context in which kernels launched from this thread run on lane ``name``'s SMs.

        A no-op for backends whose streams carry the restriction (green contexts, the tpc
        backend's stream records). The tpc launch hook masks by launching thread, not by
        stream, so there the restriction holds only inside this block; a graph keeps the mask
        in force when its executable was uploaded (docs/tpc-masks.md).
        """
        self.lane(name)
        return self._scope(name) if self._scope is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def use(self, name: str, join: bool = True):
        """Make lane ``name``'s stream current (a no-op where there is no GPU).

        On entry the lane waits for the caller's stream, so inputs made before are ready. With
        ``join`` (default) the caller's stream waits for the lane on exit, so results can be used
        right away; pass ``join=False`` to run several lanes concurrently and join them yourself
        (events or ``synchronize``). Neither waits on the host.
        """
        stream = self.stream(name)
        if stream is None:
            yield None
            return
        import torch

        caller = torch.cuda.current_stream(stream.device)
        stream.wait_stream(caller)
        with torch.cuda.stream(stream), self.lane_scope(name):
            yield stream
        if join:
            caller.wait_stream(stream)

    def table(self) -> list[dict]:
        return [lane.row() for lane in self.lanes.values()]

    def synchronize(self) -> None:
        for lane in self.lanes.values():
            if lane.stream is not None:
                lane.stream.synchronize()

    def close(self) -> None:
        if self._closed:
            raise ClosedError(
                f"partition set {self.split.key} ({self.backend}) was already closed; close it once"
            )
        try:
            self.synchronize()
        finally:
            self._closed = True
            self._release()

    def __enter__(self) -> "PartitionSet":
        self._check_open()
        return self

    def __exit__(self, *exc) -> None:
        if not self._closed:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ", ".join(
            f"{l.name}={l.granted}" for l in self._lanes.values()
        )
        return f"PartitionSet({self.backend}: {state})"


class Backend(abc.ABC):
    """Creates verified PartitionSets on one GPU."""

    name: ClassVar[str]

    def __init__(self, device: DeviceInfo | None):
        self.device = device

    @classmethod
    @abc.abstractmethod
    def unavailable_reason(cls, device: DeviceInfo | None) -> str:
        """Why this backend cannot run here, or ``""`` if it can."""

    @abc.abstractmethod
    def grant(self, split: SMSplit) -> dict[str, int]:
        """SMs each lane would get; raises InvalidSplitError naming the allowed values."""

    @abc.abstractmethod
    def open(self, split: SMSplit, verify: bool = True) -> PartitionSet:
        """Create the lanes' streams and (by default) verify them with the probe."""

    def describe(self) -> str:
        """How this backend restricts lanes, in a few words (for ``bullet info``); "" if unknown."""
        return ""
