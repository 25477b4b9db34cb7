"""The cluster spec: a YAML file describing a deployment, parsed into frozen, validated structs.

    spec = load_spec("deploy/specs/smollm2-cpu.yaml")

Validation runs in three passes, each with errors that start with the dotted field path:
1. shape: unknown keys and unknown enum values, walking the dict against the struct fields (so the
   error can list what was expected);
2. types: ``msgspec.convert(strict=True)``, its messages translated to dotted paths;
3. meaning: ranges, exclusive options, mode/section layout, backend/device, and tp/pp against the
   model's config.json when it is present on this machine (``spec.model_check`` records whether);
   under ``placement: auto`` with the model present, ``planning:`` is built into the placement
   problem once (cluster/autoplace.py), so its mistakes surface here too.

``load_spec`` adds the file and line of the offending key to the message.
"""
from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import msgspec
import yaml

from tandem.cluster.autoplace import check_planning
from tandem.cluster.spec_check import check_model, check_spec
from tandem.cluster.spec_types import (
    INTERNAL_FIELDS, ClusterSpec, InstanceSpec, ModelCheck, ModelRef, PlanningCluster, PlanningSpec,
    MigrationSpec, RouterSpec, SloSpec, SpecError, TransferSpec)
from tandem.cluster.spec_yaml import line_of, read_yaml

__all__ = [
    "ClusterSpec", "InstanceSpec", "MigrationSpec", "ModelCheck", "ModelRef", "PlanningCluster", "PlanningSpec",
    "RouterSpec", "SloSpec", "SpecError", "TransferSpec", "dump_spec", "load_spec", "parse_spec",
    "spec_to_dict",
]


def load_spec(path: str | Path) -> ClusterSpec:
    """Read and validate a YAML spec; relative model paths resolve against the file's directory."""
    path = Path(path)
    data, lines = read_yaml(path)
    try:
        return parse_spec(data, base_dir=path.parent)
    except SpecError as exc:
        line = line_of(exc.field, lines)
        location = f"{path}:{line}" if line is not None else str(path)
        raise SpecError(exc.field, exc.reason, location) from None


def parse_spec(data: dict[str, Any], base_dir: Path | None = None) -> ClusterSpec:
    """Validate a spec already parsed from YAML/JSON. Relative ``model.path`` resolves against
    ``base_dir`` (default: the current directory) and is stored absolute."""
    if not isinstance(data, dict):
        raise SpecError("spec", f"expected a mapping at the top level, got {_kind(data)}")
    data, decode_pools = _split_decode_pools(data)
    cleaned = _check_shape(data, ClusterSpec, "")
    try:
        spec = msgspec.convert(cleaned, type=ClusterSpec, strict=True)
    except msgspec.ValidationError as exc:
        raise _translate(exc, cleaned) from None
    if decode_pools is not None:
        spec = msgspec.structs.replace(spec, decode=decode_pools[0], more_decode=decode_pools[1:])
    spec = _resolve_defaults(spec, base_dir)
    check_spec(spec)
    spec = msgspec.structs.replace(spec, model_check=check_model(spec))
    check_planning(spec)  # builds the placement problem, which needs the model's config.json
    return spec


def spec_to_dict(spec: ClusterSpec) -> dict[str, Any]:
    """Plain data that ``parse_spec`` turns back into an equal spec (all defaults spelled out,
    unset options left out, the computed ``model_check`` dropped)."""
    data = msgspec.to_builtins(spec)
    for field in INTERNAL_FIELDS:
        data.pop(field, None)
    if spec.more_decode:
        data["decode"] = msgspec.to_builtins(list(spec.decode_pools))
    return _drop_none(data)


def dump_spec(spec: ClusterSpec) -> str:
    """The spec as YAML, fields in declaration order."""
    return yaml.safe_dump(spec_to_dict(spec), sort_keys=False)


# --- pass 1: shape -------------------------------------------------------------------------------

def _split_decode_pools(data: dict[Any, Any]) -> tuple[dict[Any, Any], tuple[InstanceSpec, ...] | None]:
    """``decode`` as a list of pools (each its own shape and resources): each pool checked with
    errors named ``decode.<i>.<field>``; the spec goes on with the first as ``decode``."""
    pools = data.get("decode")
    if not isinstance(pools, list):
        return data, None
    if not pools:
        raise SpecError("decode", "an empty list: give one pool (a mapping) or a list of pools")
    converted = []
    for i, pool in enumerate(pools):
        where = f"decode.{i}"
        if not isinstance(pool, dict):
            raise SpecError(where, f"expected a mapping, got {_kind(pool)}")
        cleaned = _check_shape(pool, InstanceSpec, where)
        try:
            converted.append(msgspec.convert(cleaned, type=InstanceSpec, strict=True))
        except msgspec.ValidationError as exc:
            inner = _translate(exc, cleaned)
            raise SpecError(f"{where}.{inner.field}" if inner.field != "spec" else where, inner.reason) from None
    return {**data, "decode": pools[0]}, tuple(converted)


def _check_shape(data: dict[Any, Any], cls: type[msgspec.Struct], path: str) -> dict[str, Any]:
    """Refuse unknown keys and enum values; drop null sections so they take their defaults (an
    empty ``router:`` in YAML is null, and means 'all defaults')."""
    allowed = {f.name: f.type for f in msgspec.structs.fields(cls) if f.name not in INTERNAL_FIELDS}
    cleaned: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in allowed:
            raise SpecError(where, f"unknown field (expected one of: {', '.join(allowed)})")
        struct, choices = _shape_of(allowed[key])
        if struct is not None:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise SpecError(where, f"expected a mapping, got {_kind(value)}")
            value = _check_shape(value, struct, where)
        elif choices is not None and value not in choices:
            raise SpecError(where, f"unknown value {value!r} (expected one of: "
                                   f"{', '.join(map(str, choices))})")
        cleaned[key] = value
    return cleaned


def _shape_of(annotation: Any) -> tuple[type[msgspec.Struct] | None, tuple[Any, ...] | None]:
    """(struct class, None) or (None, literal choices) or (None, None), seeing through Optional
    (an Optional literal's choices include None)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            return None, None
        struct, choices = _shape_of(args[0])
        return struct, (None, *choices) if choices is not None else None
    if origin is Literal:
        return None, typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return annotation, None
    return None, None


# --- pass 2: types -------------------------------------------------------------------------------

_EXPECTED = re.compile(r"Expected `([^`]+)`, got `([^`]+)`")
_MISSING = re.compile(r"Object missing required field `([^`]+)`")


def _translate(exc: msgspec.ValidationError, data: dict[str, Any]) -> SpecError:
    """SpecError from msgspec's "Expected `int`, got `str` - at `$.prefill.replicas`"."""
    message, _, at = str(exc).partition(" - at `")
    path = re.sub(r"\[(\d+)\]", r".\1", at.rstrip("`").removeprefix("$").lstrip("."))
    if m := _MISSING.match(message):
        return SpecError(f"{path}.{m[1]}" if path else m[1], "required field missing")
    if m := _EXPECTED.match(message):
        reason = f"expected {m[1]}, got {m[2]}"
        value = _lookup(data, path)
        if isinstance(value, str):
            reason += f" {value!r}"
            if _looks_numeric(value):
                reason += " (YAML reads a number like 1e3 as text: write 1000 or 1.0e+3)"
        return SpecError(path or "spec", reason)
    return SpecError(path or "spec", message[:1].lower() + message[1:])


def _lookup(data: Any, path: str) -> Any:
    for part in path.split(".") if path else ():
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- between passes ------------------------------------------------------------------------------

def _resolve_defaults(spec: ClusterSpec, base_dir: Path | None) -> ClusterSpec:
    """Fill the defaults that depend on other fields: absolute model, calibration and trace paths;
    under explicit placement, omitted replicas/tp/pp mean 1; under auto placement, a missing pool
    section gets all defaults (the planner sizes it)."""
    changes: dict[str, Any] = {}
    if spec.model.path:
        changes["model"] = msgspec.structs.replace(spec.model,
                                                   path=_absolute(spec.model.path, base_dir))
    if spec.planning is not None:
        changes["planning"] = _resolve_planning(spec.planning, base_dir)
    names = ("instances",) if spec.mode == "colocated" else ("prefill", "decode")
    for name in names:
        section = getattr(spec, name)
        if section is None and spec.placement == "auto":
            changes[name] = InstanceSpec()
        elif section is not None and spec.placement == "explicit":
            changes[name] = _pinned(section)
    if spec.more_decode:
        if spec.placement == "auto":
            raise SpecError("decode", "a list of decode pools is placed by hand: the planner sizes one "
                                      "decode pool (placement: explicit, or one decode section)")
        changes["more_decode"] = tuple(_pinned(pool) for pool in spec.more_decode)
    return msgspec.structs.replace(spec, **changes) if changes else spec


def _pinned(section: InstanceSpec) -> InstanceSpec:
    """Omitted replicas/tp/pp mean 1 under explicit placement."""
    return msgspec.structs.replace(section, **{f: 1 for f in ("replicas", "tp", "pp") if getattr(section, f) is None})


def _resolve_planning(planning: PlanningSpec, base_dir: Path | None) -> PlanningSpec:
    """Paths inside ``planning`` are relative to the spec file, which the planner never sees."""
    changes: dict[str, Any] = {}
    if planning.calibration:
        changes["calibration"] = _absolute(planning.calibration, base_dir)
    workload = planning.workload
    if workload is not None and isinstance(workload.get("trace"), str) and workload["trace"]:
        changes["workload"] = {**workload, "trace": _absolute(workload["trace"], base_dir)}
    return msgspec.structs.replace(planning, **changes) if changes else planning


def _absolute(path_text: str, base_dir: Path | None) -> str:
    path = Path(path_text).expanduser()
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    return str(path.resolve())


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
