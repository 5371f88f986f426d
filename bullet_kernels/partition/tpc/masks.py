"""TPC masks as values, lane placement, and the mask-bit -> SM map (pure logic, no GPU).

A :class:`TpcMask` is the set of *enabled* TPCs among the 128 bits the driver understands; the
driver wants the opposite, four ``uint32`` words with a bit set per *disabled* TPC
(:meth:`TpcMask.disabled_words`). A :class:`TpcMap` says which SMs each bit reaches. The
numbering depends on the mechanism (docs/tpc-masks.md): stream-record bits are logical TPCs
(bit b -> SMs 2b, 2b+1 on our H100 and H200), launch-descriptor bits are physical TPCs
across GPCs with floorswept gaps. Either way the map is probed once per GPU, driver and
mechanism and cached, never assumed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ...errors import BulletError, InvalidSplitError
from ..base import format_ranges

N_BITS = 128
WORDS = 4
_ALL_BITS = (1 << N_BITS) - 1
_WORD = 0xFFFFFFFF
MAP_FORMAT = 1


class TpcMapError(BulletError, ValueError):
    """A TPC map (probed or cached) that does not describe every SM exactly once."""


class TpcMask:
    """Immutable set of enabled TPC bits (0..127). ``TpcMask.of(0, 1) | TpcMask.range(8, 16)``."""

    __slots__ = ("_bits",)

    def __init__(self, bits: int = 0):
        if not isinstance(bits, int) or isinstance(bits, bool) or not 0 <= bits <= _ALL_BITS:
            raise ValueError(f"a TPC mask is an int in 0..2**{N_BITS}-1, got {bits!r}")
        object.__setattr__(self, "_bits", bits)

    def __setattr__(self, *_):
        raise AttributeError("TpcMask is immutable")

    @classmethod
    def of(cls, *tpcs: int) -> "TpcMask":
        return cls.from_tpcs(tpcs)

    @classmethod
    def from_tpcs(cls, tpcs: Iterable[int]) -> "TpcMask":
        bits = 0
        for t in tpcs:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < N_BITS:
                raise ValueError(f"TPC bit {t!r} is out of range; allowed: 0..{N_BITS - 1}")
            bits |= 1 << t
        return cls(bits)

    @classmethod
    def range(cls, start: int, stop: int) -> "TpcMask":
        """TPCs ``start <= t < stop``."""
        if not 0 <= start <= stop <= N_BITS:
            raise ValueError(f"TPC range {start}..{stop} must satisfy 0 <= start <= stop <= {N_BITS}")
        return cls(((1 << (stop - start)) - 1) << start)

    @classmethod
    def from_ranges(cls, text: str) -> "TpcMask":
        """``"0-7,64-65"`` (inclusive ranges, as :meth:`__str__` writes them) -> mask."""
        mask = cls()
        for part in filter(None, (p.strip() for p in text.split(","))):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise ValueError(f"cannot read {part!r} in {text!r}: write TPC ranges like 0-7,64-65")
            lo, hi = int(m[1]), int(m[2] or m[1])
            mask |= cls.range(lo, hi + 1)
        return mask

    @classmethod
    def all(cls, n: int = N_BITS) -> "TpcMask":
        return cls.range(0, n)

    @classmethod
    def from_disabled_words(cls, words: Iterable[int]) -> "TpcMask":
        words = list(words)
        if len(words) != WORDS or any(not 0 <= w <= _WORD for w in words):
            raise ValueError(f"expected {WORDS} uint32 disable words, got {words!r}")
        disabled = sum(w << (32 * i) for i, w in enumerate(words))
        return cls(_ALL_BITS & ~disabled)

    @classmethod
    def from_hex(cls, text: str) -> "TpcMask":
        try:
            return cls(int(text, 16))
        except ValueError:
            raise ValueError(f"{text!r} is not a hex TPC mask such as 0xff") from None

    @property
    def bits(self) -> int:
        return self._bits

    def disabled_words(self) -> list[int]:
        """What the driver wants: 4 uint32, word 0 = TPCs 0..31, a set bit disables that TPC."""
        disabled = _ALL_BITS & ~self._bits
        return [(disabled >> (32 * i)) & _WORD for i in range(WORDS)]

    def hex(self) -> str:
        return hex(self._bits)

    def complement(self, n: int = N_BITS) -> "TpcMask":
        """TPCs among the first ``n`` that are not in this mask."""
        return TpcMask.all(n) - self

    def __or__(self, other: "TpcMask") -> "TpcMask":
        return TpcMask(self._bits | other._bits)

    def __and__(self, other: "TpcMask") -> "TpcMask":
        return TpcMask(self._bits & other._bits)

    def __sub__(self, other: "TpcMask") -> "TpcMask":
        return TpcMask(self._bits & ~other._bits)

    def union(self, other: "TpcMask") -> "TpcMask":
        return self | other

    def intersection(self, other: "TpcMask") -> "TpcMask":
        return self & other

    def __iter__(self) -> Iterator[int]:
        bits, i = self._bits, 0
        while bits:
            if bits & 1:
                yield i
            bits >>= 1
            i += 1

    def popcount(self) -> int:
        return bin(self._bits).count("1")

    __len__ = popcount

    def __bool__(self) -> bool:
        return self._bits != 0

    def __contains__(self, tpc: object) -> bool:
        return isinstance(tpc, int) and 0 <= tpc < N_BITS and bool(self._bits >> tpc & 1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TpcMask) and self._bits == other._bits

    def __hash__(self) -> int:
        return hash(("TpcMask", self._bits))

    def __str__(self) -> str:
        return format_ranges(list(self))

    def __repr__(self) -> str:
        return f"TpcMask({str(self) or 'empty'})"


def place_lanes(granted: dict[str, int], tpc_count: int, overlap: bool, sms_per_tpc: int = 2) -> dict[str, range]:
    """Logical TPC indices (0..tpc_count-1) of each lane, from ``grant_tpc``'s SM counts.

    Lanes sit side by side from TPC 0 in lane order. An overlap split (two lanes) puts the
    first at the bottom and the second at the top, so they share only the middle and each
    keeps its SMs when the other grows or shrinks.
    """
    sizes = {name: -(-sms // sms_per_tpc) for name, sms in granted.items()}
    for name, n in sizes.items():
        if not 0 < n <= tpc_count:
            raise InvalidSplitError(f"lane {name!r} needs {n} TPCs; allowed: 1..{tpc_count}")
    if overlap and len(sizes) == 2:
        (first, n1), (second, n2) = sizes.items()
        return {first: range(0, n1), second: range(tpc_count - n2, tpc_count)}
    if sum(sizes.values()) > tpc_count:
        raise InvalidSplitError(
            f"lanes need {sum(sizes.values())} TPCs ({sizes}) but this GPU has {tpc_count}; "
            "shrink them or use an overlap split of two lanes"
        )
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = range(start, start + n)
        start += n
    return out


@dataclasses.dataclass(frozen=True)
class TpcMap:
    """Which SMs each of the 128 mask bits reaches on one GPU (empty for dead bits)."""

    sm_count: int
    bits: tuple[frozenset[int], ...]
    uuid: str = ""
    driver: str = ""  # "<driver API version>/<kernel driver>/<mechanism>", e.g. "13000/580.159.04/record"

    @classmethod
    def linear(cls, sm_count: int, sms_per_tpc: int = 2, **ids) -> "TpcMap":
        """Bit b reaches SMs 2b and 2b+1: the stream-record numbering measured on our H100 and H200."""
        tpcs = -(-sm_count // sms_per_tpc)
        bits = [frozenset(range(b * sms_per_tpc, min(sm_count, (b + 1) * sms_per_tpc))) for b in range(tpcs)]
        return cls(sm_count, tuple(bits) + (frozenset(),) * (N_BITS - tpcs), **ids)

    @property
    def live_bits(self) -> tuple[int, ...]:
        """Bits that reach at least one SM, ascending: logical TPC i is ``live_bits[i]``."""
        return tuple(b for b, sms in enumerate(self.bits) if sms)

    @property
    def tpc_count(self) -> int:
        return len(self.live_bits)

    @property
    def live(self) -> TpcMask:
        return TpcMask.from_tpcs(self.live_bits)

    def mask_for(self, logical: range) -> TpcMask:
        live = self.live_bits
        if logical.start < 0 or logical.stop > len(live):
            raise ValueError(f"logical TPCs {logical.start}..{logical.stop - 1} out of range 0..{len(live) - 1}")
        return TpcMask.from_tpcs(live[i] for i in logical)

    def sms(self, mask: TpcMask) -> frozenset[int]:
        return frozenset().union(*(self.bits[b] for b in mask))

    def problems(self) -> list[str]:
        """Why this map cannot be trusted (empty list if it can)."""
        if len(self.bits) != N_BITS:
            return [f"map has {len(self.bits)} bits, expected {N_BITS}"]
        owner: dict[int, int] = {}
        out = []
        for b, sms in enumerate(self.bits):
            for sm in sms:
                if not 0 <= sm < self.sm_count:
                    out.append(f"bit {b} reaches SM {sm}, outside 0..{self.sm_count - 1}")
                elif sm in owner:
                    out.append(f"SM {sm} is reached by bits {owner[sm]} and {b}")
                else:
                    owner[sm] = b
        missing = sorted(set(range(self.sm_count)) - owner.keys())
        if missing:
            out.append(f"SMs {format_ranges(missing)} are reached by no bit")
        return out

    def validate(self) -> "TpcMap":
        problems = self.problems()
        if problems:
            raise TpcMapError(
                f"TPC map of {self.uuid or 'this GPU'} (driver {self.driver or '?'}) is inconsistent: "
                + "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "")
                + ". Every SM must belong to exactly one mask bit."
            )
        return self

    def to_json(self) -> str:
        bits = {str(b): sorted(sms) for b, sms in enumerate(self.bits) if sms}
        doc = {"format": MAP_FORMAT, "uuid": self.uuid, "driver": self.driver, "sm_count": self.sm_count, "bits": bits}
        return json.dumps(doc, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TpcMap":
        """Parse and validate; TpcMapError says what is wrong."""
        try:
            doc = json.loads(text)
            if doc.get("format") != MAP_FORMAT:
                raise TpcMapError(f"TPC map format {doc.get('format')!r}, expected {MAP_FORMAT}")
            bits = [frozenset()] * N_BITS
            for key, sms in doc["bits"].items():
                if not 0 <= int(key) < N_BITS:
                    raise TpcMapError(f"TPC map names bit {key}; allowed: 0..{N_BITS - 1}")
                bits[int(key)] = frozenset(int(s) for s in sms)
            tmap = cls(int(doc["sm_count"]), tuple(bits), str(doc.get("uuid", "")), str(doc.get("driver", "")))
        except TpcMapError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TpcMapError(f"cannot read TPC map JSON: {exc!r}") from exc
        return tmap.validate()


def probe_map(observe: Callable[[TpcMask], frozenset[int]], sm_count: int, **ids) -> TpcMap:
    """Build a TpcMap from ``observe(enabled mask) -> SMs a probe ran on``.

    Leave-one-out: bit b's SMs are those missing when only b is disabled. Every probe keeps all
    other bits enabled, so it can never run with no live TPC (a kernel with no SM never
    finishes), even where bit 0 is a floorswept TPC. We stop once every SM is accounted for.
    """
    full_mask = TpcMask.all()
    full = observe(full_mask)
    if full != frozenset(range(sm_count)):
        raise TpcMapError(
            f"a probe with every TPC enabled ran on {len(full)} of {sm_count} SMs; the probe or "
            "the stream mask is not working (is the GPU busy with other work?)"
        )
    bits: list[frozenset[int]] = []
    covered: set[int] = set()
    for b in range(N_BITS):
        if len(covered) == sm_count:
            break
        sms = full - observe(full_mask - TpcMask.of(b))
        bits.append(sms)
        covered |= sms
    bits += [frozenset()] * (N_BITS - len(bits))
    return TpcMap(sm_count, tuple(bits), **ids).validate()


def cache_dir() -> Path:
    return Path(os.environ.get("BULLET_CACHE_DIR") or Path.home() / ".cache" / "bullet_kernels")


def cache_path(uuid: str, driver: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{uuid}-{driver}")
    return cache_dir() / f"tpc-map-{safe}.json"


def load_cached(uuid: str, driver: str, sm_count: int) -> tuple[TpcMap | None, str]:
    """``(map, "")``, or ``(None, why it cannot be used)`` for a missing or stale cache file."""
    path = cache_path(uuid, driver)
    try:
        tmap = TpcMap.from_json(path.read_text())
    except FileNotFoundError:
        return None, f"no cached map at {path}"
    except (OSError, TpcMapError) as exc:
        return None, f"cached map {path} unusable: {exc}"
    if (tmap.uuid, tmap.driver, tmap.sm_count) != (uuid, driver, sm_count):
        return None, f"cached map {path} is for {tmap.uuid} driver {tmap.driver} with {tmap.sm_count} SMs"
    return tmap, ""


def save_cached(tmap: TpcMap) -> Path:
    """Write atomically (a concurrent reader sees the old file or the new one, never half)."""
    path = cache_path(tmap.uuid, tmap.driver)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(tmap.to_json())
    os.replace(tmp, path)
    return path
