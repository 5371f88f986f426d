"""The ``none`` backend: every lane runs on the whole GPU (baselines; machines without partitions).

Asking for it is an explicit choice to run unpartitioned, so each lane is granted all SMs and
the table says so. Without a GPU the lanes have no stream and run on the CPU.
"""

from __future__ import annotations

from ..device import DeviceInfo
from . import verification
from .base import Backend, Lane, PartitionSet
from .config import SMSplit


class NoneBackend(Backend):
    name = "none"

    @classmethod
    def unavailable_reason(cls, device: DeviceInfo | None) -> str:
        return ""

    def describe(self) -> str:
        return "no restriction (plain torch streams on the whole GPU)"

    def grant(self, split: SMSplit) -> dict[str, int]:
        sm_count = self.device.sm_count if self.device else 0
        return {name: sm_count for name in split.names}

    def open(self, split: SMSplit, verify: bool = True) -> PartitionSet:
        lanes: dict[str, Lane] = {}
        d = self.device
        for name, asked in split.items():
            stream = None
            if d is not None:
                import torch

                stream = torch.cuda.Stream(d.index)
            lanes[name] = Lane(name, asked, d.sm_count if d else 0, stream, whole_gpu=True)
        pset = PartitionSet(self.name, split, d, lanes, disjoint=False)
        if verify and d is not None:
            verification.probe_and_check(pset)
        return pset
