"""Semantic checks on a typed cluster spec: ranges, exclusive options, section layout per mode,
backend/device compatibility, and (when the model's config.json is at hand) tp/pp divisibility.

Each check raises ``SpecError`` naming the first offending field; checks run in document order so
the error a user sees first is the one nearest the top of the file.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from tandem.cluster.spec_types import ClusterSpec, InstanceSpec, ModelCheck, ModelRef, SpecError
from tandem.engine.parallel import Parallelism, parallelism_error

# RFC 1123 label: the name becomes part of Ray actor, placement group and job names.
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

MAX_HTTP_REPLICAS = 64  # ingress processes on one host; more is a typo, not a deployment


def check_spec(spec: ClusterSpec) -> None:
    """All checks that need nothing but the spec itself."""
    _check_name(spec.name)
    _check_model_ref(spec.model)
    _check_layout(spec)
    _check_planning(spec)
    for where, section in spec.sections.items():
        check_instance(section, where)
    _check_block_sizes(spec)
    _at_least(spec.transfer.timeout_s, 0, "transfer.timeout_s", strict=True)
    _at_least(spec.router.request_timeout_s, 0, "router.request_timeout_s", strict=True)
    _at_least(spec.router.result_ttl_s, 0, "router.result_ttl_s", strict=True)
    _at_least(spec.router.max_requests, 1, "router.max_requests")
    _at_least(spec.router.health_timeout_s, 0, "router.health_timeout_s", strict=True)
    _check_migration(spec)
    _check_http(spec)
    if spec.slo is not None:
        _at_least(spec.slo.ttft_ms, 0, "slo.ttft_ms", strict=True)
        _at_least(spec.slo.tpot_ms, 0, "slo.tpot_ms", strict=True)
        _fraction(spec.slo.attainment, "slo.attainment")
    _check_backend(spec)


def check_instance(section: InstanceSpec, where: str) -> None:
    """Ranges of one pool's fields."""
    _at_least(section.max_restarts, 0, f"{where}.max_restarts")
    _check_gpus(section, where)
    for field in ("replicas", "tp", "pp"):
        value = getattr(section, field)
        if value is not None:
            _at_least(value, 1, f"{where}.{field}")
    _at_least(section.block_size, 1, f"{where}.block_size")
    if section.block_size & (section.block_size - 1):
        raise SpecError(f"{where}.block_size", f"must be a power of 2, got {section.block_size}")
    if section.num_blocks is not None and section.memory_fraction is not None:
        raise SpecError(f"{where}.memory_fraction",
                        "give either num_blocks or memory_fraction, not both")
    if section.num_blocks is not None:
        _at_least(section.num_blocks, 1, f"{where}.num_blocks")
    if section.memory_fraction is not None:
        _fraction(section.memory_fraction, f"{where}.memory_fraction")
        if section.device != "cpu" and (section.tp or 1) * (section.pp or 1) > 1:
            raise SpecError(f"{where}.memory_fraction", "on cuda it sizes one worker's cache from its "
                            "own GPU memory; a tensor/pipeline-parallel pool needs num_blocks")
    _at_least(section.max_batch_tokens, 1, f"{where}.max_batch_tokens")
    _at_least(section.max_num_seqs, 1, f"{where}.max_num_seqs")
    if section.long_prefill_tokens is not None:
        _at_least(section.long_prefill_tokens, 1, f"{where}.long_prefill_tokens")
    if section.chunked_prefill and section.max_batch_tokens < section.max_num_seqs:
        raise SpecError(f"{where}.max_batch_tokens",
                        f"with chunked_prefill it must be >= max_num_seqs ({section.max_num_seqs}), "
                        f"got {section.max_batch_tokens}: every running request decodes in every step")
    _at_least(section.num_cpus, 0, f"{where}.num_cpus")


def _check_migration(spec: ClusterSpec) -> None:
    m = spec.migration
    _at_least(m.interval_s, 0, "migration.interval_s", strict=True)
    _at_least(m.imbalance_threshold, 0, "migration.imbalance_threshold")
    for name in ("max_moves_per_pass", "max_blocks_in_flight", "max_bytes_in_flight", "min_stage_blocks"):
        _at_least(getattr(m, name), 1, f"migration.{name}")
    for name in ("max_stages", "recompute_max_tokens", "growth_horizon_tokens"):
        _at_least(getattr(m, name), 0, f"migration.{name}")


def _check_http(spec: ClusterSpec) -> None:
    if spec.http is None:
        return
    if not 0 < spec.http.port < 65536:
        raise SpecError("http.port", f"must be a TCP port (1-65535), got {spec.http.port}")
    if not spec.http.host:
        raise SpecError("http.host", "must name an interface, e.g. 127.0.0.1")
    if not 1 <= spec.http.replicas <= MAX_HTTP_REPLICAS:
        raise SpecError("http.replicas", f"must be 1 to {MAX_HTTP_REPLICAS} ingress processes, "
                                         f"got {spec.http.replicas}")


def _at_least(value: float, low: float, where: str, *, strict: bool = False) -> None:
    ok = value > low if strict else value >= low
    if not ok or math.isnan(value):
        op = ">" if strict else ">="
        raise SpecError(where, f"must be {op} {low}, got {value}")
    if math.isinf(value):
        raise SpecError(where, f"must be finite, got {value}")


def _check_gpus(section: InstanceSpec, where: str) -> None:
    if section.num_gpus is None:
        return
    if section.device == "cpu" and section.num_gpus != 0:
        raise SpecError(f"{where}.num_gpus", f"only cuda pools reserve GPUs (this pool's device is cpu), "
                                             f"got {section.num_gpus}")
    if section.device != "cpu" and not 0 < section.num_gpus <= 1:
        raise SpecError(f"{where}.num_gpus", "a single-device instance takes one GPU or a share of one: "
                                             f"must be in (0, 1], got {section.num_gpus}")


def _fraction(value: float, where: str) -> None:
    if not 0 < value <= 1:
        raise SpecError(where, f"must be in (0, 1], got {value}")


def _check_name(name: str) -> None:
    if not _DNS_LABEL.fullmatch(name):
        raise SpecError("name", f"{name!r} is not DNS-like (lowercase letters, digits and '-', "
                                "starting and ending with a letter or digit, at most 63 characters)")


def _check_model_ref(model: ModelRef) -> None:
    if model.path is not None and model.name is not None:
        raise SpecError("model", "give either path or name, not both")
    if model.path is None and model.name is None:
        raise SpecError("model", "give either path (a Hugging Face directory) or name "
                                 "(a prepared model such as smollm2)")
    for field in ("path", "name"):
        if getattr(model, field) == "":
            raise SpecError(f"model.{field}", "must not be empty")


def _check_layout(spec: ClusterSpec) -> None:
    """Which instance sections each mode takes. Under auto placement a missing section has
    already been filled with defaults (the planner sizes it), so only explicit specs reach the
    'required' errors."""
    if spec.mode == "colocated":
        required, forbidden = ("instances",), ("prefill", "decode")
    else:
        required, forbidden = ("prefill", "decode"), ("instances",)
    for field in forbidden:
        if getattr(spec, field) is not None:
            raise SpecError(field, f"not allowed in {spec.mode} mode (use "
                                   f"{' and '.join(required)})")
    for field in required:
        if getattr(spec, field) is None:
            raise SpecError(field, f"required in {spec.mode} mode")
    if spec.placement == "auto" and spec.slo is None:
        raise SpecError("slo", "required when placement is auto (the planner sizes the cluster "
                               "to meet it)")


def _check_planning(spec: ClusterSpec) -> None:
    """``planning`` feeds the planner, which only runs under auto placement; its sections in the
    placement schema are checked by cluster.autoplace, which needs the model."""
    if spec.planning is None:
        return
    if spec.placement != "auto":
        raise SpecError("planning", "only allowed when placement is auto (the planner reads it): "
                                    "remove it, or set placement: auto")
    if spec.planning.cluster is not None:
        _at_least(spec.planning.cluster.nodes, 1, "planning.cluster.nodes")
        _at_least(spec.planning.cluster.devices_per_node, 1, "planning.cluster.devices_per_node")


def _check_block_sizes(spec: ClusterSpec) -> None:
    # The transfer layer could re-block KV between pools, but does not yet: refuse until it does.
    if spec.prefill is None:
        return
    for where, section in spec.sections.items():
        if section.block_size != spec.prefill.block_size:
            raise SpecError(f"{where}.block_size", f"must equal prefill.block_size "
                                                   f"({spec.prefill.block_size}) for now")


def _check_backend(spec: ClusterSpec) -> None:
    # nccl and cuda_ipc move device memory, shm maps host memory: each needs its device on both sides.
    needs = {"nccl": "cuda", "cuda_ipc": "cuda", "shm": "cpu"}.get(spec.transfer.backend)
    if needs is None:
        return
    for where, section in spec.sections.items():
        if section.device != needs:
            raise SpecError("transfer.backend", f"{spec.transfer.backend} needs device {needs} "
                                                f"({where}.device is {section.device})")


# --- model-aware checks ----------------------------------------------------------------------

def check_model(spec: ClusterSpec) -> ModelCheck:
    """tp/pp against the model's shape, when its config.json can be found on this machine.

    A model absent here is not an error: specs are often written on one machine and deployed on
    another. The returned ModelCheck records whether the checks ran.
    """
    config_path, skipped = _find_config(spec.model)
    if config_path is None:
        return ModelCheck(config_path=None, skipped_reason=skipped)
    config = _read_config(config_path, "model.path" if spec.model.path else "model.name")
    for where, section in spec.sections.items():
        _check_divisibility(section, where, config)
    return ModelCheck(config_path=str(config_path), skipped_reason=None)


def _find_config(model: ModelRef) -> tuple[Path | None, str | None]:
    """(config.json path, None), or (None, why the checks are skipped)."""
    if model.path is not None:
        directory = Path(model.path)
        if not directory.exists():
            return None, f"model.path {directory} does not exist on this machine"
        if not directory.is_dir():
            raise SpecError("model.path", f"{directory} is not a directory")
        if not (directory / "config.json").is_file():
            raise SpecError("model.path", f"{directory} has no config.json")
        return directory / "config.json", None
    try:
        # Lazy: engine.prepare is only needed when a spec names a prepared model.
        from tandem.engine.prepare import resolve_model

        directory = resolve_model(model.name or "")
    except (ImportError, FileNotFoundError) as exc:
        return None, f"model.name {model.name!r} not available here: {exc}"
    if not (Path(directory) / "config.json").is_file():
        return None, f"prepared model {directory} has no config.json"
    return Path(directory) / "config.json", None


def _read_config(path: Path, where: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(where, f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise SpecError(where, f"{path} is not a JSON object")
    return config


def _positive_int(config: dict[str, Any], key: str) -> int | None:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _check_divisibility(section: InstanceSpec, where: str, config: dict[str, Any]) -> None:
    """Each tp rank takes whole attention heads and whole KV heads (or, when tp is a multiple of
    the KV heads, one replicated KV head); each pp stage at least one layer. Values the planner
    has yet to choose are skipped."""
    heads = _positive_int(config, "num_attention_heads")
    layers = _positive_int(config, "num_hidden_layers")
    # A field config.json lacks constrains nothing (KV heads default to the attention heads).
    shape = dict(num_heads=heads or 1, num_kv_heads=_positive_int(config, "num_key_value_heads") or heads or 1,
                 num_layers=layers or section.pp or 1)
    tp = section.tp if heads is not None else None
    for field, value, par in (("tp", tp, Parallelism(tp or 1, 1)), ("pp", section.pp, Parallelism(1, section.pp or 1))):
        error = parallelism_error(par, **shape) if value is not None else None
        if error is not None:
            raise SpecError(f"{where}.{field}", error)
