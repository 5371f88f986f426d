"""Which SM split and lane the current code runs on.

``with bullet_kernels.on_lane("decode", SMSplit(prefill=96, decode=36)):`` makes that lane's
partition stream current and tells the ``bullet`` torch.compile backend which graph to
capture/replay. Without a selection, work runs on the whole GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading

from ..engine.warn import warn_once
from ..errors import UnsupportedError
from ..partition import DEFAULT_BACKEND, Partitioner, PartitionSet, SMSplit


@dataclasses.dataclass(frozen=True)
class LaneSelection:
    pset: PartitionSet
    lane: str
    partitioner: Partitioner  # the one that opened pset (graphs of the selection are keyed by it)

    @property
    def split(self) -> SMSplit:
        return self.pset.split


_current: contextvars.ContextVar[LaneSelection | None] = contextvars.ContextVar("bullet_lane", default=None)
_default_partitioner: Partitioner | None = None
_default_split: SMSplit | None = None
_lock = threading.Lock()


def default_partitioner(backend: str = DEFAULT_BACKEND) -> Partitioner:
    """The process-wide Partitioner used when on_lane() is not given one (created on first use)."""
    global _default_partitioner
    with _lock:
        if _default_partitioner is None or _default_partitioner.backend.name != backend:
            _default_partitioner = Partitioner(backend)
        return _default_partitioner


def set_default_split(split: SMSplit | str | None) -> None:
    """The split on_lane() uses when it is given only a lane name."""
    global _default_split
    _default_split = SMSplit.parse(split) if isinstance(split, str) else split


def current() -> LaneSelection | None:
    return _current.get()


@contextlib.contextmanager
def on_lane(
    lane: str,
    split: SMSplit | str | None = None,
    partitioner: Partitioner | None = None,
    join: bool = True,
    strict: bool = False,
):
    """Run the body on ``lane`` of ``split`` (default: the split set by set_default_split).

    ``join`` as in :meth:`PartitionSet.use`: False lets lanes entered one after another overlap.
    Where the partition backend cannot run at all (no GPU, no green contexts), the body runs on
    the whole device with a warning (once per reason) and the selection is None; ``strict=True``
    raises instead. A partition that fails verification always raises: it is never used.
    """
    split = SMSplit.parse(split) if isinstance(split, str) else (split or _default_split)
    if split is None:
        raise ValueError(
            f"on_lane({lane!r}) needs a split: pass one, e.g. on_lane('decode', 'prefill=96,decode=36'), "
            "or call bullet_kernels.set_default_split(...) first"
        )
    try:
        partitioner = partitioner or default_partitioner()
        pset = partitioner.get(split)
    except UnsupportedError as exc:
        if strict:
            raise
        warn_once(f"bullet_kernels: {exc}; running lane {lane!r} on the whole device", stacklevel=4)
        yield None
        return
    selection = LaneSelection(pset, lane, partitioner)
    pset.lane(lane)  # fail early, naming the lanes, if this split has no such lane
    token = _current.set(selection)
    try:
        with pset.use(lane, join=join):
            yield selection
    finally:
        _current.reset(token)
