"""Where a step runs: one lane of an SM split, or the whole GPU."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..partition import SMSplit

WHOLE_GPU_LANE = "main"  # the single lane of a whole-GPU placement


@dataclasses.dataclass(frozen=True)
class Placement:
    """``Placement(SMSplit(prefill=96, decode=36), "decode")``; ``Placement(None)``: whole GPU.

    A split may be given as text (``"prefill=96,decode=36"``); the lane must be one of its lanes.
    """

    split: SMSplit | None = None
    lane: str = WHOLE_GPU_LANE

    WHOLE_GPU: ClassVar["Placement"]

    def __post_init__(self) -> None:
        if isinstance(self.split, str):
            object.__setattr__(self, "split", SMSplit.parse(self.split))
        if self.split is None:
            if self.lane != WHOLE_GPU_LANE:
                raise ValueError(
                    f"a whole-GPU placement has the single lane {WHOLE_GPU_LANE!r}, got lane {self.lane!r}; "
                    "give a split to run on one of its lanes"
                )
        elif not isinstance(self.split, SMSplit):
            raise TypeError(f"split must be an SMSplit, its text form or None, got {self.split!r}")
        elif self.lane not in self.split:
            raise ValueError(f"split {self.split} has no lane {self.lane!r}; lanes: {', '.join(self.split.names)}")

    @property
    def whole_gpu(self) -> bool:
        return self.split is None

    def __str__(self) -> str:
        return "whole-gpu" if self.split is None else f"{self.split.key}:{self.lane}"


Placement.WHOLE_GPU = Placement(None)
WHOLE_GPU = Placement.WHOLE_GPU
