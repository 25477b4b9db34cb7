"""Pre-flight: could the instances a launch asks for ever fit the Ray cluster? Checked before any
actor or placement group starts, so an infeasible spec fails in seconds, naming the pool and what
is short, instead of blocking in a placement-group wait or failing inside the actors after the
model has loaded. CPUs and memory are checked against the cluster's capacity, not what is free
right now: what other work holds may be released (the launch then waits for it, bounded). Pure
(no Ray): the launcher passes in what Ray reports."""
from __future__ import annotations

import msgspec

from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig, decode_groups
from tandem.cluster.spec_types import decode_section_names
from tandem.engine.parallel import kv_head_range, layer_range
from tandem.placement.model_spec import ModelSpec, normalize_dtype

GIB = 2**30


class Capacity(msgspec.Struct, frozen=True):
    """The Ray cluster's resources as Ray reports them, over all live nodes and on the largest."""

    cpus: float
    largest_node_cpus: float
    gpus: float
    largest_node_gpus: float
    memory_bytes: float  # Ray's memory and object store resources together: the nodes' RAM
    largest_node_memory_bytes: float


def pools(config: LaunchConfig) -> dict[str, InstanceGroup]:
    """The launch's instance groups by the spec section that describes them (``decode.1`` for
    the second of a list of decode pools)."""
    if config.mode == "colocated":
        return {"instances": config.decode}
    decode = decode_groups(config)
    named = dict(zip(decode_section_names(len(decode)), decode))
    return named if config.prefill is None else {"prefill": config.prefill, **named}


def shortfall(config: LaunchConfig, capacity: Capacity, model: ModelSpec) -> str | None:
    """Why the launch can never fit the cluster (CPUs, GPUs, host memory), or None."""
    return (resource_shortfall(config, "CPU", capacity.cpus, capacity.largest_node_cpus)
            or _gpu_less_cuda(config)
            or resource_shortfall(config, "GPU", capacity.gpus, capacity.largest_node_gpus)
            or memory_shortfall(config, capacity, model))


def _gpu_less_cuda(config: LaunchConfig) -> str | None:
    for section, group in pools(config).items():
        if group.engine.device != "cpu" and group.num_gpus <= 0:
            return (f"{section}.num_gpus: a {group.engine.device} instance must reserve a GPU or a "
                    f"share of one, got {group.num_gpus:g}")
    return None


def resource_shortfall(config: LaunchConfig, resource: str, total: float, largest_node: float) -> str | None:
    """Why one bundle per model worker cannot hold ``resource`` (CPU or GPU): a worker larger
    than the largest node, or more in all than the cluster has; None if they may fit."""
    field = "num_cpus" if resource == "CPU" else "num_gpus"
    groups = {s: g for s, g in pools(config).items() if getattr(g, field) > 0}
    for section, group in groups.items():
        if getattr(group, field) > largest_node:
            who = "instance" if group.workers == 1 else "worker (of tp x pp per instance)"
            return (f"{section}.{field}: each {who} needs {getattr(group, field):g} {resource}, but the "
                    f"largest node of the Ray cluster has {largest_node:g}")
        if group.one_node and group.workers * getattr(group, field) > largest_node + 1e-9:
            return (f"{section}.one_node: each instance needs {group.workers} workers x "
                    f"{getattr(group, field):g} {resource} = {group.workers * getattr(group, field):g} "
                    f"{resource} on one node, but the largest node of the Ray cluster has {largest_node:g}")
    need = sum(g.replicas * g.workers * getattr(g, field) for g in groups.values())
    if need > total + 1e-9:
        asked = " + ".join(f"{s}: {g.replicas} x {_workers(g)}{getattr(g, field):g} {resource}"
                           for s, g in groups.items())
        return f"{asked} = {need:g} {resource}, but the Ray cluster has {total:g} {resource} in all"
    return None


def _workers(group: InstanceGroup) -> str:
    par = group.engine.parallelism
    return "" if group.workers == 1 else f"(tp={par.tp} x pp={par.pp} workers) x "


def memory_shortfall(config: LaunchConfig, capacity: Capacity, model: ModelSpec) -> str | None:
    """CPU pools whose weights plus KV cache cannot fit the nodes' memory (a lower bound: the
    engine's activations and packed weights come on top)."""
    cpu_pools = {s: g for s, g in pools(config).items() if g.engine.device == "cpu"}
    for section, group in cpu_pools.items():
        per_node = 1 if group.one_node else group.workers  # workers whose memory one node holds
        weights, kv = (part / per_node for part in instance_memory_bytes(group, model))
        if weights + kv > capacity.largest_node_memory_bytes:
            who = "instance" if per_node == 1 else "worker"
            return (f"{section}: each {who} needs at least {_gib(weights + kv)} of host memory "
                    f"(weights {_gib(weights)} + KV cache {_gib(kv)}, {_kv_source(group)}), but the "
                    f"largest node of the Ray cluster has {_gib(capacity.largest_node_memory_bytes)}")
    need = sum(g.replicas * sum(instance_memory_bytes(g, model)) for g in cpu_pools.values())
    if need > capacity.memory_bytes:
        asked = " + ".join(f"{s}: {g.replicas} x {_gib(sum(instance_memory_bytes(g, model)))}"
                           for s, g in cpu_pools.items())
        return f"{asked} of host memory = {_gib(need)}, but the Ray cluster has {_gib(capacity.memory_bytes)}"
    return None


def instance_memory_bytes(group: InstanceGroup, model: ModelSpec) -> tuple[int, int]:
    """(weights, KV cache) bytes of one instance of ``group`` over all its workers, as its engine
    will size them (a parallel instance's KV budget is each worker's, its largest shard decides)."""
    engine = group.engine
    dtype = _dtype(engine.dtype, model, engine.device)
    per_block = int(engine.block_size * model.kv_bytes_per_token(dtype))
    par = engine.parallelism
    largest = len(layer_range(model.layers, par.pp, 0)) * len(kv_head_range(model.kv_heads, par.tp, 0))
    shard = largest / (model.layers * model.kv_heads)  # the largest worker's share of a block
    num_blocks = engine.num_blocks or max(1, int(engine.kv_cache_bytes // (per_block * shard)))
    return int(model.weight_bytes(dtype)), int(num_blocks * per_block * shard) * group.workers


def _dtype(name: str, model: ModelSpec, device: str) -> str:
    """The engine's dtype (``auto``: fp32 checkpoints stay fp32; others run bf16 on CPU)."""
    if name != "auto":
        return normalize_dtype(name)
    if model.default_dtype == "fp32":
        return "fp32"
    return "bf16" if device == "cpu" else model.default_dtype


def _kv_source(group: InstanceGroup) -> str:
    engine = group.engine
    if engine.num_blocks:
        return f"num_blocks={engine.num_blocks} x block_size={engine.block_size}"
    return f"block_size={engine.block_size} in a {_gib(engine.kv_cache_bytes)} budget"


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.3g} GiB"
