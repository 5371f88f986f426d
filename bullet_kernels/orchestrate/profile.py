"""Measured latency profiles: ``graphs/<gpu>/<model>.json`` in the ``bullet-profile/1`` schema.

The schema and units are specified in ``graphs/README.md``; this module reads, checks and
writes those files and nothing else (the profiler measures, the estimator interpolates).

    >>> prof = Profile.load(find_profile("h200", "llama-3.1-8b"))
    >>> prof.check_matches(device_name="NVIDIA H200", sm_count=132, strict=True)
    >>> prof.points("decode", split="whole-gpu", batch=32)
    >>> prof.add_point("decode", {"batch": 8, "context": 512, "split": "whole-gpu", "lane": "main", "ms": 7.1})
    >>> prof.save(profile_path("h200", "llama-3.1-8b"))

Shipped profiles live in the source checkout's ``graphs/`` folder, beside the package, not
inside it: an installed wheel has none, so point ``BULLET_GRAPHS_DIR`` at a folder of them.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

from ..errors import BulletError

SCHEMA = "bullet-profile/1"
GRIDS = ("prefill", "decode", "corun")
WHOLE_GPU = "whole-gpu"
NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")  # first char alphanumeric: no "..", no hidden files

# Top-level fields every profile has, with their JSON types (unknown fields are allowed).
REQUIRED = {
    "schema": str, "gpu": str, "model": str, "model_config": dict, "dtype": str, "weights": str,
    "device": dict, "driver": dict, "software": dict, "commit": str, "command": str,
    "created": str, "updated": str, "complete": bool, "engine": dict, "timing": dict,
    "power": dict, "sm_configs": list, "grid": dict, "prefill": list, "decode": list, "corun": list,
}

# The axes that make a point unique, per grid (corun's are inside its two sub-dicts).
AXES = {"prefill": ("tokens", "group", "split", "lane"), "decode": ("batch", "context", "split", "lane")}
CORUN_SIDES = {"prefill": ("tokens", "group"), "decode": ("batch", "context")}
TIMES = ("alone_ms", "corun_ms", "slowdown")

# Model config fields that shape latency: our ModelConfig name -> the names a config may use
# (ours first, then Hugging Face's).
LATENCY_FIELDS = {
    "architecture": ("architecture", "model_type"),
    "hidden_size": ("hidden_size",),
    "intermediate_size": ("intermediate_size",),
    "num_layers": ("num_layers", "num_hidden_layers"),
    "num_heads": ("num_heads", "num_attention_heads"),
    "num_kv_heads": ("num_kv_heads", "num_key_value_heads"),
    "head_dim": ("head_dim",),
    "vocab_size": ("vocab_size",),
}


class ProfileError(BulletError, ValueError):
    """A profile file or point that breaks the bullet-profile/1 schema (graphs/README.md)."""


class MissingProfile(BulletError, FileNotFoundError):
    """No profile for this GPU and model; the message names the path and the command that makes it."""


class ProfileMismatch(BulletError, ValueError):
    """A profile measured on another GPU or model than the one running."""


def graphs_dir() -> Path:
    """``$BULLET_GRAPHS_DIR`` if set, else the source checkout's ``graphs/`` (shipped profiles)."""
    env = os.environ.get("BULLET_GRAPHS_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "graphs"


def check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(
            f"{kind} name {name!r} must be lower-case letters, digits, '.', '_' or '-', starting "
            f"with a letter or digit (it becomes part of the path graphs/<gpu>/<model>.json)"
        )


def profile_path(gpu: str, model: str, root: str | Path | None = None) -> Path:
    """``<root>/<gpu>/<model>.json``; ``root`` defaults to :func:`graphs_dir`."""
    check_name("GPU", gpu)
    check_name("model", model)
    return Path(root if root is not None else graphs_dir()) / gpu / f"{model}.json"


def find_profile(gpu: str, model: str, root: str | Path | None = None) -> Path:
    """The existing profile's path, or MissingProfile saying where we looked and how to make it."""
    path = profile_path(gpu, model, root)
    if path.is_file():
        return path
    others = sorted(p.stem for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
    present = f"; profiles for {gpu} here: {', '.join(others)}" if others else ""
    raise MissingProfile(
        f"no latency profile for model {model!r} on GPU {gpu!r}: looked at {path}{present}. "
        f"Make it on a {gpu} with `bullet profile --model {model}`, or set BULLET_GRAPHS_DIR to "
        f"a folder holding <gpu>/<model>.json"
    )


SIMULATION_GPU = "h200"  # whose shipped profiles stand in on a machine without a GPU


def local_profile(model: str) -> Path:
    """This GPU's profile of ``model`` (:func:`find_profile`), or the shipped H200 one on a
    machine without a GPU (for simulations and reports that need no GPU)."""
    from ..device import describe_state
    from ..results import gpu_slug

    device, _ = describe_state()
    return find_profile(gpu_slug(device.name) if device else SIMULATION_GPU, model)


def sm_config_name(split_key: str | None) -> str:
    """The SM configuration a point names: a split's key, or ``"whole-gpu"`` for no split."""
    if split_key is None:
        return WHOLE_GPU
    if not isinstance(split_key, str) or not split_key:
        raise ValueError(f"a split key is a non-empty string or None (whole GPU), got {split_key!r}")
    return split_key


def model_config_dict(config: Any) -> dict:
    """A plain JSON-able dict of a model config: a ModelConfig becomes its Hugging Face
    ``config.json`` dict (the schema stores the HF config, and ``ModelConfig.from_hf`` reads it
    back); a mapping is copied; another dataclass goes through ``dataclasses.asdict``."""
    if hasattr(config, "to_hf"):
        return config.to_hf()
    if isinstance(config, Mapping):
        return json.loads(json.dumps(dict(config)))  # a deep, JSON-typed copy
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if hasattr(config, "to_dict"):  # a transformers PretrainedConfig
        return config.to_dict()
    raise TypeError(f"a model config is a ModelConfig, a mapping or a dataclass, got {type(config).__name__}")


def latency_shape(config: Any) -> dict:
    """The fields of a model config that shape latency, under our ModelConfig names; fields a
    config leaves out are derived the way ``ModelConfig.from_hf`` does, or omitted."""
    cfg = model_config_dict(config) if not isinstance(config, Mapping) else config
    shape = {}
    for ours, names in LATENCY_FIELDS.items():
        value = next((cfg[n] for n in names if cfg.get(n) is not None), None)
        if value is not None:
            shape[ours] = value
    if "num_kv_heads" not in shape and "num_heads" in shape:
        shape["num_kv_heads"] = shape["num_heads"]
    if "head_dim" not in shape and {"hidden_size", "num_heads"} <= shape.keys():
        shape["head_dim"] = shape["hidden_size"] // shape["num_heads"]
    return shape


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_ms(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _non_finite(value, where: str):
    """Paths of NaN/inf numbers: strict JSON has none, and json.dump would write them anyway."""
    if isinstance(value, float) and not math.isfinite(value):
        yield where
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _non_finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _non_finite(v, f"{where}[{i}]")


def _check_axis(point: Mapping, field: str, where: str) -> list[str]:
    if field not in point:
        return [f"{where} lacks {field!r}"]
    value = point[field]
    if field in ("split", "lane"):
        ok, allowed = isinstance(value, str) and bool(value), "a non-empty string"
    elif field in ("group", "context"):
        ok, allowed = _is_int(value) and value >= 0, "an int >= 0"
    else:
        ok, allowed = _is_int(value) and value > 0, "an int > 0"
    return [] if ok else [f"{where} {field!r} must be {allowed}, got {value!r}"]


def _check_time(point: Mapping, field: str, where: str) -> list[str]:
    if field not in point:
        return [f"{where} lacks {field!r}"]
    if not _positive_ms(point[field]):
        what = "a positive ratio" if field == "slowdown" else "a positive number of milliseconds"
        return [f"{where} {field!r} must be {what}, got {point[field]!r}"]
    return []


def point_problems(grid: str, point: Any, where: str | None = None) -> list[str]:
    """Every way ``point`` breaks its grid's schema (empty when it is fine)."""
    _check_grid(grid)
    where = where or f"{grid} point"
    if not isinstance(point, Mapping):
        return [f"{where} must be a dict, got {type(point).__name__}"]
    if grid != "corun":
        problems = [p for f in AXES[grid] for p in _check_axis(point, f, where)]
        return problems + _check_time(point, "ms", where)
    problems = _check_axis(point, "split", where)
    for side, axes in CORUN_SIDES.items():
        sub = point.get(side)
        if not isinstance(sub, Mapping):
            problems.append(f"{where} {side!r} must be a dict with {', '.join(axes + TIMES)}, got {sub!r}")
            continue
        problems += [p for f in axes for p in _check_axis(sub, f, f"{where}.{side}")]
        problems += [p for f in TIMES for p in _check_time(sub, f, f"{where}.{side}")]
    return problems


def _check_grid(grid: str) -> None:
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; grids: {', '.join(GRIDS)}")


@dataclasses.dataclass(repr=False)
class Profile:
    """One profile document. ``doc`` is the whole JSON kept as is, so fields this version does
    not know survive a load/save round trip; ``path`` is where it was loaded from or saved to."""

    doc: dict
    path: Path | None = dataclasses.field(default=None, compare=False)

    def __repr__(self) -> str:
        counts = ", ".join(f"{g}={len(self.doc.get(g) or [])}" for g in GRIDS)
        return f"Profile({self.doc.get('gpu')}/{self.doc.get('model')}, complete={self.doc.get('complete')}, {counts})"

    # ---- fields

    @property
    def gpu(self) -> str:
        return self.doc["gpu"]

    @property
    def model(self) -> str:
        return self.doc["model"]

    @property
    def complete(self) -> bool:
        return self.doc["complete"]

    @complete.setter
    def complete(self, value: bool) -> None:
        self.doc["complete"] = bool(value)

    @property
    def device(self) -> dict:
        return self.doc["device"]

    @property
    def model_config(self) -> dict:
        return self.doc["model_config"]

    @property
    def engine(self) -> dict:
        return self.doc["engine"]

    @property
    def sm_configs(self) -> list[dict]:
        return self.doc["sm_configs"]

    @property
    def prefill(self) -> list[dict]:
        return self.doc["prefill"]

    @property
    def decode(self) -> list[dict]:
        return self.doc["decode"]

    @property
    def corun(self) -> list[dict]:
        return self.doc["corun"]

    # ---- making, reading, writing

    @classmethod
    def new(cls, *, gpu: str, model: str, model_config: dict, device: dict, driver: dict, software: dict,
            commit: str, command: str, engine: dict, timing: dict, power: dict, grid: dict,
            dtype: str = "bfloat16", weights: str = "random") -> "Profile":
        """An empty, incomplete profile (no points, no SM configurations yet)."""
        check_name("GPU", gpu)
        check_name("model", model)
        now = utc_now()
        prof = cls({
            "schema": SCHEMA, "gpu": gpu, "model": model, "model_config": model_config_dict(model_config),
            "dtype": dtype, "weights": weights, "device": device, "driver": driver, "software": software,
            "commit": commit, "command": command, "created": now, "updated": now, "complete": False,
            "engine": engine, "timing": timing, "power": power, "sm_configs": [], "grid": grid,
            "prefill": [], "decode": [], "corun": [],
        })
        prof.validate()  # a wrong argument type shows here, not at the first save hours later
        return prof

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise MissingProfile(
                f"no profile at {path}; make it with `bullet profile --model {path.stem}`"
            ) from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path} is not valid JSON ({exc}); expected a {SCHEMA} document") from None
        if not isinstance(doc, dict):
            raise ProfileError(f"{path} holds a JSON {type(doc).__name__}; expected a {SCHEMA} object")
        prof = cls(doc, path)
        prof.validate()
        return prof

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file in the same folder, then rename): a run killed mid-write
        leaves the previous file intact, which is what resuming relies on."""
        path = Path(path)
        self.doc["updated"] = utc_now()
        self.validate()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.doc, indent=1, allow_nan=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a shipped profile is readable by all
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.path = path
        return path

    # ---- checking

    def validate(self) -> None:
        """Raise ProfileError naming every field and point that breaks the schema."""
        doc, problems = self.doc, []
        if doc.get("schema") != SCHEMA:
            problems.append(f"'schema' must be {SCHEMA!r}, got {doc.get('schema')!r}")
        problems += [f"missing top-level field {key!r}" for key in REQUIRED if key not in doc]
        problems += [
            f"{key!r} must be a JSON {_json_type(kind)}, got {type(doc[key]).__name__}"
            for key, kind in REQUIRED.items()
            if key in doc and not isinstance(doc[key], kind)
        ]
        for key in ("gpu", "model"):
            if isinstance(doc.get(key), str) and not NAME.fullmatch(doc[key]):
                problems.append(f"{key!r} {doc[key]!r} must be lower-case letters, digits, '.', '_' or '-'")
        if isinstance(doc.get("sm_configs"), list):
            for i, c in enumerate(doc["sm_configs"]):
                problems += _sm_config_problems(c, f"sm_configs[{i}]")
        for grid in GRIDS:
            if not isinstance(doc.get(grid), list):
                continue
            seen = {}
            for i, point in enumerate(doc[grid]):
                found = point_problems(grid, point, f"{grid}[{i}]")
                problems += found
                if not found:
                    key = self.point_key(grid, point)
                    if key in seen:
                        problems.append(f"{grid}[{i}] repeats {grid}[{seen[key]}] (same axes {key})")
                    seen.setdefault(key, i)
        problems += [f"non-finite number at {w} (use null for a value that could not be measured)"
                     for w in _non_finite(doc, "")]
        if problems:
            where = f"{self.path}" if self.path else "profile"
            raise ProfileError(f"{where} breaks the {SCHEMA} schema (graphs/README.md): " + "; ".join(problems))

    def check_matches(self, *, device_name: str | None = None, sm_count: int | None = None,
                      model_config: Any = None, dtype: str | None = None, strict: bool = True) -> list[str]:
        """Compare the profile with what is running; arguments left None are not compared.

        Returns the mismatches as sentences; with ``strict`` any mismatch raises ProfileMismatch.
        ``model_config`` may be a ModelConfig or a config dict with our or Hugging Face names.
        """
        found = []
        device = self.doc.get("device") or {}
        if device_name is not None and device.get("name") != device_name:
            found.append(f"GPU: the profile was measured on {device.get('name')!r}, this is {device_name!r}")
        if sm_count is not None and device.get("sm_count") != sm_count:
            found.append(f"SM count: the profile's GPU has {device.get('sm_count')} SMs, this one has {sm_count}")
        if dtype is not None and self.doc.get("dtype") != dtype:
            found.append(f"dtype: the profile measured {self.doc.get('dtype')!r}, running {dtype!r}")
        if model_config is not None:
            theirs, ours = latency_shape(self.doc.get("model_config") or {}), latency_shape(model_config)
            for field, value in ours.items():
                if field not in theirs:
                    found.append(f"model {field}: the profile's model_config does not say; running {value!r}")
                elif theirs[field] != value:
                    found.append(f"model {field}: the profile has {theirs[field]!r}, running {value!r}")
        if found and strict:
            where = self.path or f"{self.doc.get('gpu')}/{self.doc.get('model')}"
            raise ProfileMismatch(
                f"profile {where} does not match what is running: " + "; ".join(found)
                + f". Measure this GPU and model with `bullet profile --model {self.doc.get('model')}` "
                "(or use the profile made for them)"
            )
        return found

    # ---- points

    @staticmethod
    def point_key(grid: str, point: Mapping) -> tuple:
        """The axes that make a point unique in its grid (graphs/README.md)."""
        _check_grid(grid)
        try:
            if grid == "corun":
                pre, dec = point["prefill"], point["decode"]
                return (point["split"], pre["tokens"], pre["group"], dec["batch"], dec["context"])
            return tuple(point[f] for f in AXES[grid])
        except (KeyError, TypeError) as exc:
            raise ProfileError(
                f"{grid} point lacks its axis {exc}; a {grid} point needs {_axes_text(grid)}: {point!r}"
            ) from None

    def has_point(self, grid: str, point_or_key: Mapping | tuple) -> bool:
        key = point_or_key if isinstance(point_or_key, tuple) else self.point_key(grid, point_or_key)
        return any(self.point_key(grid, p) == key for p in self.doc[grid])

    def add_point(self, grid: str, point: Mapping) -> bool:
        """Append ``point`` (a copy); False, adding nothing, when one with the same axes exists,
        so a resumed run skips what it already measured. ProfileError for a malformed point."""
        problems = point_problems(grid, point)
        problems += [f"non-finite number at {w} (use null for a value that could not be measured)"
                     for w in _non_finite(point, grid)] if not problems else []
        if problems:
            raise ProfileError(f"{grid} point breaks the {SCHEMA} schema: " + "; ".join(problems))
        if self.has_point(grid, point):
            return False
        self.doc[grid].append(copy.deepcopy(dict(point)))
        return True

    def add_sm_config(self, split: str, lane: str, asked: int, granted: int) -> None:
        """Record a lane the points name; the same lane again is a no-op, but with other SM
        counts it is refused: its points would mix two sizes under one name."""
        entry = {"split": split, "lane": lane, "asked": asked, "granted": granted}
        problems = _sm_config_problems(entry, "sm config")
        if problems:
            raise ProfileError("; ".join(problems))
        for old in self.doc["sm_configs"]:
            if (old.get("split"), old.get("lane")) == (split, lane):
                if (old.get("asked"), old.get("granted")) != (asked, granted):
                    raise ProfileError(
                        f"SM configuration {split}/{lane} is already recorded with asked={old.get('asked')}, "
                        f"granted={old.get('granted')}; now asked={asked}, granted={granted}. Points of one "
                        "configuration must share one SM count: profile into a fresh file"
                    )
                return
        self.doc["sm_configs"].append(entry)

    def points(self, grid: str, **where) -> list[dict]:
        """The points of ``grid`` whose top-level fields equal ``where``, in file order."""
        _check_grid(grid)
        missing = object()
        return [p for p in self.doc[grid] if all(p.get(k, missing) == v for k, v in where.items())]


def _sm_config_problems(c: Any, where: str) -> list[str]:
    if not isinstance(c, Mapping):
        return [f"{where} must be a dict with split, lane, asked, granted, got {c!r}"]
    problems = [f"{where} {f!r} must be a non-empty string, got {c.get(f)!r}"
                for f in ("split", "lane") if not (isinstance(c.get(f), str) and c.get(f))]
    return problems + [f"{where} {f!r} must be an int > 0 (SMs), got {c.get(f)!r}"
                       for f in ("asked", "granted") if not (_is_int(c.get(f)) and c.get(f) > 0)]


def _axes_text(grid: str) -> str:
    if grid == "corun":
        return "split, prefill.tokens, prefill.group, decode.batch, decode.context"
    return ", ".join(AXES[grid])


def _json_type(kind: type) -> str:
    return {str: "string", dict: "object", list: "array", bool: "boolean"}[kind]
