"""The placement input (a YAML document) parsed into frozen, validated structs.

``problem_from_dict`` takes a plain dict so a cluster spec can embed the same sections and pass
them through (with ``where`` naming the enclosing key in error messages). Errors are ``SpecError``
whose message names the offending field, e.g. ``slo.ttft_ms: must be > 0``; unknown keys are errors.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

import msgspec
import yaml

from .calibrate import CalibratedProfile, load_profile
from .hardware import CustomHardware, HardwareProfile, get_profile, profile_from_custom
from .model_spec import ModelSpec, load_model, normalize_dtype
from .policy import Policy
from .sim_core import Slo
from .workload import Arrival, Fixed, LengthDist, LogNormal, Uniform, Workload, load_trace
from .yaml_safe import load_yaml

Pos = Annotated[int, msgspec.Meta(ge=1)]


class SpecError(ValueError):
    """An invalid placement spec; the message starts with the dotted path of the field."""


class Cluster(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Identical nodes, each with the same number of devices."""

    nodes: Pos
    devices_per_node: Pos

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node


class SearchOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Knobs of the search: which algorithm, how many simulated requests, how wide to look."""

    algorithm: Literal["auto", "high-affinity", "low-affinity"] = "auto"
    requests: Annotated[int, msgspec.Meta(ge=50)] = 600  # per single-instance simulation
    max_requests: Annotated[int, msgspec.Meta(ge=50)] = 8000  # cap for whole-deployment simulations
    seed: int = 0
    max_joint: Pos = 12  # whole-deployment goodput searches for the branch and bound
    alternatives: Annotated[int, msgspec.Meta(ge=0)] = 4  # runners-up simulated for the output
    max_tp: Pos = 64  # 64 bounds devices_per_node, so the default adds no limit of its own
    max_pp: Pos = 8
    warmup: Annotated[float, msgspec.Meta(ge=0, lt=0.45)] = 0.1  # least share left out per end


class _WorkloadSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    arrival: Union[Literal["poisson", "gamma"], Arrival] = Arrival()
    rate: Annotated[float, msgspec.Meta(gt=0)] | None = None
    input_len: Union[Pos, Fixed, Uniform, LogNormal, None] = None
    output_len: Union[Pos, Fixed, Uniform, LogNormal, None] = None
    trace: str | None = None


class _Spec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str
    hardware: Union[str, CustomHardware]
    cluster: Cluster
    slo: Slo
    workload: _WorkloadSection
    dtype: str | None = None
    policy: Policy = Policy()
    search: SearchOptions = SearchOptions()
    calibration: str | None = None


class Problem(msgspec.Struct, frozen=True):
    """Everything the search needs, resolved: model shape, hardware numbers, targets, workload."""

    model: ModelSpec
    dtype: str
    hardware: HardwareProfile
    cluster: Cluster
    slo: Slo
    workload: Workload
    policy: Policy = Policy()
    search: SearchOptions = SearchOptions()
    calibration: CalibratedProfile | None = None


_EXPECTED = re.compile(r"Expected `([^`]+)`( ([<>]=?) (\S+))?(, got `([^`]+)`)?")


def _translate(exc: msgspec.ValidationError) -> tuple[str, str]:
    """(dotted path, reason) from msgspec's 'Expected `float` > 0.0 - at `$.slo.ttft_ms`'."""
    text = str(exc)
    message, _, at = text.partition(" - at `")
    path = at.rstrip("`").removeprefix("$").lstrip(".")
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    if m := re.match(r"Object contains unknown field `([^`]+)`", message):
        return (f"{path}.{m[1]}" if path else m[1]), "unknown field"
    if m := re.match(r"Object missing required field `([^`]+)`", message):
        return (f"{path}.{m[1]}" if path else m[1]), "required"
    if (m := _EXPECTED.match(message)) and m[2]:
        bound = m[4].removesuffix(".0")
        return path, f"must be {m[3]} {bound}"
    if m and m[6]:
        return path, f"expected {m[1]}, got {m[6]}"
    return path, message[0].lower() + message[1:]


def _length(value: object) -> LengthDist | None:
    return Fixed(value=value) if isinstance(value, int) else value  # type: ignore[return-value]


def _check_dist(dist: LengthDist | None, field: str) -> None:
    if isinstance(dist, Uniform) and dist.high < dist.low:
        raise SpecError(f"workload.{field}.high: must be >= low ({dist.low})")
    if isinstance(dist, LogNormal) and dist.max is not None and dist.max < dist.min:
        raise SpecError(f"workload.{field}.max: must be >= min ({dist.min})")


def _workload(section: _WorkloadSection, base_dir: Path | None) -> Workload:
    arrival = section.arrival if isinstance(section.arrival, Arrival) else Arrival(process=section.arrival)
    if arrival.process == "poisson" and arrival.cv != 1.0:
        raise SpecError("workload.arrival.cv: only a gamma process takes cv (poisson has cv 1)")
    inp, out = _length(section.input_len), _length(section.output_len)
    if section.trace is not None:
        if inp is not None or out is not None:
            raise SpecError("workload.trace: give either a trace or input_len/output_len, not both")
        path = Path(section.trace).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            pairs = load_trace(path)
        except ValueError as exc:
            raise SpecError(f"workload.trace: {exc}") from None
        return Workload(arrival=arrival, rate=section.rate, trace=pairs, trace_path=str(path))
    for name, dist in (("input_len", inp), ("output_len", out)):
        if dist is None:
            raise SpecError(f"workload.{name}: required (or give a trace)")
        _check_dist(dist, name)
    return Workload(arrival=arrival, rate=section.rate, input_len=inp, output_len=out)


def _hardware(value: str | CustomHardware) -> HardwareProfile:
    try:
        return get_profile(value) if isinstance(value, str) else profile_from_custom(value)
    except ValueError as exc:
        sep = ": " if isinstance(value, str) else "."
        raise SpecError(f"hardware{sep}{exc}") from None


def problem_from_dict(data: object, base_dir: Path | None = None, where: str = "") -> Problem:
    """Validate a placement document (already parsed from YAML/JSON) into a ``Problem``.

    Relative paths (model, trace, calibration) resolve against ``base_dir``. ``where`` prefixes
    field paths in errors when the sections are embedded in a larger document.
    """
    prefix = f"{where}." if where else ""
    try:
        return _resolve(data, base_dir)
    except SpecError as exc:
        raise SpecError(prefix + str(exc)) from None


def _resolve(data: object, base_dir: Path | None) -> Problem:
    if not isinstance(data, dict):
        raise SpecError(f"spec: expected a mapping, got {type(data).__name__}")
    try:
        spec = msgspec.convert(data, _Spec)
    except msgspec.ValidationError as exc:
        path, reason = _translate(exc)
        raise SpecError(f"{path or 'spec'}: {reason}") from None
    try:
        model = load_model(spec.model, base_dir)
    except ValueError as exc:
        raise SpecError(f"model: {exc}") from None
    hardware = _hardware(spec.hardware)
    try:
        dtype = normalize_dtype(spec.dtype) if spec.dtype else model.default_dtype
        hardware.peak_flops(dtype)
    except ValueError as exc:
        raise SpecError(f"dtype: {exc}") from None
    calibration = None
    if spec.calibration is not None:
        path = Path(spec.calibration).expanduser()
        try:
            calibration = load_profile(path if path.is_absolute() or base_dir is None else base_dir / path)
        except ValueError as exc:
            raise SpecError(f"calibration: {exc}") from None
    workload = _workload(spec.workload, base_dir)
    if spec.cluster.devices_per_node > 64:
        raise SpecError("cluster.devices_per_node: must be <= 64")
    return Problem(model=model, dtype=dtype, hardware=hardware, cluster=spec.cluster, slo=spec.slo,
                   workload=workload, policy=spec.policy, search=spec.search,
                   calibration=calibration)


def load_problem(path: str | Path) -> Problem:
    """Read a YAML placement spec; paths inside it are relative to the file's directory."""
    path = Path(path)
    try:
        data = load_yaml(path.read_text())
    except OSError as exc:
        raise SpecError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({exc})") from None
    except ValueError as exc:  # an alias
        raise SpecError(f"{path}: {exc}") from None
    return problem_from_dict(data, base_dir=path.parent)
