"""Green-context backend (default): official driver SM partitions through cuda-python.

Each lane gets a green context holding its SM group and one non-blocking stream in it; torch
sees the stream as an ExternalStream. The driver picks which SMs; the probe tells us.
torch's own ``GreenContext.create`` failed on our driver ("operation not supported"), so we
call ``cuda.bindings.driver`` directly.
"""

from __future__ import annotations

import os
import warnings

from ..device import DeviceInfo, check, driver_module
from ..errors import UnsupportedError
from . import hook_state, verification
from .base import Backend, Lane, PartitionSet
from .config import SMSplit, grant_green


GREEN_OPEN_ATTEMPTS = 3  # fresh sets tried before a split is refused
SETTLE_ENV = "BULLET_GREEN_SETTLE_PROBES"
CARVE_ENV = "BULLET_GREEN_CARVE"
CARVES = ("split", "atoms")
_atoms_by_device: dict[int, tuple[list, object]] = {}  # one split of the device into atoms per process


def carve_mode() -> str:
    """How lanes are cut from the device's SMs (``BULLET_GREEN_CARVE``):

    - ``split`` (default): each lane split off the remainder of the device by its own
      ``cuDevSmResourceSplitByCount``, per set;
    - ``atoms``: the device split once per process into groups of the alignment size, every lane
      of every set a list of those groups (``cuDevResourceGenerateDesc`` of several resources).
      An experiment for the growing-lane flicker: lanes of different splits then share the
      driver's resource objects, not only SM ids. Measured on the H200, it changed nothing (24
      short probes of 144 against 23; docs/green-contexts.md), so ``split`` stays the default.
    """
    mode = os.environ.get(CARVE_ENV, "split").strip().lower() or "split"
    if mode not in CARVES:
        raise ValueError(f"{CARVE_ENV} must be one of {', '.join(CARVES)}, got {mode!r}")
    return mode


def settle_probes() -> int:
    """Re-probes of a set that undercounted before fresh contexts are made (``BULLET_GREEN_SETTLE_PROBES``,
    default 0: off until the fade experiment, docs/green-contexts.md, says it helps)."""
    raw = os.environ.get(SETTLE_ENV, "0")
    if not raw.isdigit():
        raise ValueError(f"{SETTLE_ENV} must be a whole number of re-probes (0 turns them off), got {raw!r}")
    return int(raw)


class GreenBackend(Backend):
    name = "green"

    def __init__(self, device: DeviceInfo | None):
        super().__init__(device)
        self.reopened: list[tuple[str, list[str]]] = []  # (split, refusals) of sets made again

    @classmethod
    def unavailable_reason(cls, device: DeviceInfo | None) -> str:
        if device is None:
            return "no GPU"
        if not device.green_contexts:
            return f"green contexts unsupported: {device.green_unavailable_reason}"
        return ""

    def grant(self, split: SMSplit) -> dict[str, int]:
        d = self._require_device()
        return grant_green(split, d.sm_count, d.min_partition_sms, d.partition_alignment_sms)

    def _require_device(self) -> DeviceInfo:
        reason = self.unavailable_reason(self.device)
        if reason:
            raise UnsupportedError(f"green backend unavailable: {reason}; try backend='none'")
        return self.device

    def describe(self) -> str:
        return "green contexts (cuGreenCtxStreamCreate streams)"

    def open(self, split: SMSplit, verify: bool = True) -> PartitionSet:
        import torch

        d = self._require_device()
        granted = self.grant(split)
        whole = len(granted) == 1 and next(iter(granted.values())) == d.sm_count
        if hook_state.hook_installed() and not whole:
            # Measured on the H100 (driver 580, docs/tpc-masks.md): once a launch callback is
            # subscribed, cuGreenCtxCreate fails with CUDA_ERROR_NOT_SUPPORTED; sets opened before keep working.
            raise UnsupportedError(
                "green contexts cannot be created in a process where the tpc backend's launch hook is "
                f"installed (driver {d.driver_api_version_str} refuses them: CUDA_ERROR_NOT_SUPPORTED). Open the "
                "green partitions you need before using backend='tpc' with the hook mechanism, or use one "
                "backend per process (the tpc stream-record mechanism installs no hook)"
            )
        drv = driver_module()
        dev = check(drv.cuDeviceGet(d.index), "cuDeviceGet")
        torch.cuda.init()  # the primary context must exist before green contexts (driver advice)
        created: list[tuple[object, object]] = []  # (green ctx or None, CUstream)

        def destroy(entries: list) -> None:
            for gctx, stream in reversed(entries):
                if gctx is not None:
                    check(drv.cuStreamDestroy(stream), "cuStreamDestroy")
                    check(drv.cuGreenCtxDestroy(gctx), "cuGreenCtxDestroy")
            entries.clear()

        def release() -> None:
            destroy(created)

        def build() -> PartitionSet:
            if whole:
                (name,) = granted
                lanes = {name: Lane(name, split[name], d.sm_count, torch.cuda.Stream(d.index), whole_gpu=True)}
            else:
                lanes = self._carve(drv, dev, split, granted, created)
            return PartitionSet(self.name, split, d, lanes, release, disjoint=True)

        if not verify or whole:
            return verification.open_verified(build, release, verify)
        # A new green context's stream has run on an earlier context's SMs (docs/green-contexts.md).
        # Such a set is never handed out: its contexts are kept aside until a fresh set has been
        # made and verified (so the driver cannot hand the same ones back), then destroyed.
        refused: list = []

        def set_aside() -> None:
            refused.extend(created)
            created.clear()

        try:
            pset, failures = verification.open_verified_retrying(build, release, set_aside, GREEN_OPEN_ATTEMPTS,
                                                                 settle=settle_probes())
        finally:
            destroy(refused)
        if failures:
            self.reopened.append((split.key, failures))
            reprobed = sum(f.startswith("(probed again)") for f in failures)
            warnings.warn(f"bullet_kernels: green split {split.key} failed verification {len(failures)} time(s) "
                          f"({reprobed} passed on probing the same set again, {len(failures) - reprobed} made again "
                          f"with fresh contexts); the verified set is used. First refusal: {failures[0]}",
                          RuntimeWarning, stacklevel=2)
        return pset

    def _carve(self, drv, dev, split: SMSplit, granted: dict[str, int], created: list) -> dict[str, Lane]:
        if carve_mode() == "atoms":
            return self._carve_atoms(drv, dev, split, granted, created)
        return self._carve_split(drv, dev, split, granted, created)

    def _lane(self, drv, dev, split: SMSplit, name: str, resources: list, created: list) -> Lane:
        """A green context over ``resources`` (SM groups of one split call) and a stream in it."""
        import torch

        got = sum(int(r.sm.smCount) for r in resources)
        if got < split[name]:
            raise UnsupportedError(f"driver granted {got} SMs to lane {name!r}, which asked for {split[name]}")
        desc = check(drv.cuDevResourceGenerateDesc(resources, len(resources)), "cuDevResourceGenerateDesc")
        gctx = check(
            drv.cuGreenCtxCreate(desc, dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM),
            "cuGreenCtxCreate",
        )
        stream = check(
            drv.cuGreenCtxStreamCreate(gctx, drv.CUstream_flags.CU_STREAM_NON_BLOCKING, 0),
            "cuGreenCtxStreamCreate",
        )
        created.append((gctx, stream))
        return Lane(name, split[name], got, torch.cuda.ExternalStream(int(stream), device=self.device.index))

    def _carve_atoms(self, drv, dev, split: SMSplit, granted: dict[str, int], created: list) -> dict[str, Lane]:
        d = self.device
        size = d.partition_alignment_sms
        if d.index not in _atoms_by_device:
            whole = check(drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
                          "cuDeviceGetDevResource")
            groups, n, left = check(drv.cuDevSmResourceSplitByCount(d.sm_count // size, whole, 0, size),
                                    f"cuDevSmResourceSplitByCount(atoms of {size} SMs)")
            _atoms_by_device[d.index] = (list(groups[:n]), left)
        atoms, left = _atoms_by_device[d.index]
        order = sorted(granted, key=lambda n: granted[n] % size != 0)  # the remainder lane last
        lanes, at = {}, 0
        for i, name in enumerate(order):
            want = granted[name]
            last = i == len(order) - 1
            count = want // size if not last or want % size == 0 else (want - int(left.sm.smCount)) // size
            taken = atoms[at:at + count] + ([left] if last and want % size else [])
            at += count
            if sum(int(r.sm.smCount) for r in taken) != want:
                raise UnsupportedError(f"lane {name!r} ({want} SMs) is not a whole number of {size}-SM atoms "
                                       f"(plus the {int(left.sm.smCount)} left over, last lane only)")
            lanes[name] = self._lane(drv, dev, split, name, taken, created)
        return {n: lanes[n] for n in split.names}

    def _carve_split(self, drv, dev, split: SMSplit, granted: dict[str, int], created: list) -> dict[str, Lane]:
        d = self.device
        align = d.partition_alignment_sms
        sm_type = drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
        rest = check(drv.cuDeviceGetDevResource(dev, sm_type), "cuDeviceGetDevResource")
        # Aligned lanes are split off one by one; a lane granted the unaligned remainder goes last.
        order = sorted(granted, key=lambda n: granted[n] % align != 0)
        lanes: dict[str, Lane] = {}
        for i, name in enumerate(order):
            want = granted[name]
            takes_rest = i == len(order) - 1 and want == rest.sm.smCount
            if takes_rest:
                group = rest
            else:
                result, n_groups, rest = check(
                    drv.cuDevSmResourceSplitByCount(1, rest, 0, want),
                    f"cuDevSmResourceSplitByCount(lane {name!r}, {want} SMs)",
                )
                if n_groups < 1:
                    raise UnsupportedError(f"driver could not split {want} SMs for lane {name!r}")
                group = result[0]
            lanes[name] = self._lane(drv, dev, split, name, [group], created)
        return {n: lanes[n] for n in split.names}  # keep the caller's lane order

