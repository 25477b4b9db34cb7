"""Turn a validated ClusterSpec into what the launcher starts (pure: no Ray)."""
from __future__ import annotations

import os

from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
from tandem.cluster.spec_types import ClusterSpec, InstanceSpec, SpecError
from tandem.engine.engine import EngineConfig
from tandem.engine.parallel import Parallelism
from tandem.engine.scheduler import SchedulerConfig


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _group(inst: InstanceSpec, dtype: str) -> InstanceGroup:
    """An instance pool; with tp or pp above 1 each instance is tp x pp workers, each with the
    section's num_cpus/num_gpus (and its KV budget)."""
    kv_bytes = EngineConfig().kv_cache_bytes
    num_gpus = inst.num_gpus if inst.num_gpus is not None else float(inst.device != "cpu")
    on_gpu = inst.device != "cpu"  # there the engine measures what its share of the GPU leaves
    if inst.memory_fraction is not None and not on_gpu:
        kv_bytes = int(inst.memory_fraction * host_memory_bytes())
    engine = EngineConfig(
        dtype=dtype, device=inst.device, block_size=inst.block_size, num_blocks=inst.num_blocks,
        kv_cache_bytes=kv_bytes, memory_fraction=inst.memory_fraction if on_gpu else None,
        device_share=num_gpus if on_gpu else 1.0,
        scheduler=SchedulerConfig(max_num_seqs=inst.max_num_seqs,
                                  max_num_batched_tokens=inst.max_batch_tokens,
                                  chunked_prefill=inst.chunked_prefill,
                                  long_prefill_tokens=inst.long_prefill_tokens),
        parallelism=Parallelism(inst.tp or 1, inst.pp or 1),
    )
    return InstanceGroup(replicas=inst.replicas or 1, engine=engine, num_cpus=inst.num_cpus,
                         num_gpus=num_gpus, num_threads=max(1, int(inst.num_cpus)),
                         max_restarts=inst.max_restarts, one_node=inst.one_node)


def model_directory(spec: ClusterSpec):
    """The local HF directory the spec's model refers to (a prepared name or a path)."""
    from tandem.engine.prepare import resolve_model

    try:
        return resolve_model(spec.model.path or spec.model.name)
    except FileNotFoundError as exc:
        raise SpecError("model", str(exc)) from exc


def launch_config(spec: ClusterSpec, model_dir: str) -> LaunchConfig:
    if spec.needs_planning:
        # Planning needs the cluster's size, which only the launcher (with Ray) knows.
        raise SpecError("placement", "auto placement must be planned first (Cluster.from_spec "
                                     "plans it; `tandem plan SPEC --write-spec OUT` writes the plan)")
    dtype = spec.model.dtype
    backend = spec.transfer.backend
    if backend == "nccl":
        _check_nccl_here()
    common = dict(name=spec.name, model_dir=model_dir, transfer_backend=backend,
                  transfer_timeout_s=spec.transfer.timeout_s, request_timeout_s=spec.router.request_timeout_s,
                  result_ttl_s=spec.router.result_ttl_s, max_requests=spec.router.max_requests,
                  health_timeout_s=spec.router.health_timeout_s, recompute_lost=spec.router.recompute_lost,
                  migration=spec.migration,
                  prefill_policy=spec.router.prefill_policy, decode_policy=spec.router.decode_policy)
    if spec.mode == "colocated":
        return LaunchConfig(mode="colocated", decode=_group(spec.instances, dtype), **common)
    decode = tuple(_group(pool, dtype) for pool in spec.decode_pools)
    return LaunchConfig(mode="disaggregated", prefill=_group(spec.prefill, dtype), decode=decode[0],
                        more_decode=decode[1:], **common)


def _check_nccl_here() -> None:
    # parse_spec cannot know where a spec will run; launching it is the first point that does.
    from tandem.transfer.nccl_runtime import UNAVAILABLE, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        raise SpecError("transfer.backend", f"{UNAVAILABLE}: {reason}")
