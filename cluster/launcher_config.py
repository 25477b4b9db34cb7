"""What the launcher starts (pure data, no Ray)."""
from __future__ import annotations

import msgspec

from tandem.cluster.spec_types import MigrationSpec
from tandem.engine.engine import EngineConfig

NAMESPACE = "tandem"  # the Ray namespace of every tandem actor


class InstanceGroup(msgspec.Struct, frozen=True):
    """A pool of identical instances. A parallel instance (``engine.parallelism`` above (1, 1)) is
    tp x pp workers, and ``num_cpus``/``num_gpus``/``num_threads`` are each worker's."""

    replicas: int
    engine: EngineConfig
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # GPUs (or a share of one) Ray reserves for each instance (worker)
    num_threads: int = 1
    max_restarts: int = 0  # times Ray restarts an instance whose process died or whose step failed
    one_node: bool = False  # every worker of an instance on one node (STRICT_PACK), else PACK

    @property
    def strategy(self) -> str:
        """The Ray placement-group strategy of each instance's bundles."""
        return "STRICT_PACK" if self.one_node else "PACK"

    @property
    def workers(self) -> int:
        """Model workers per instance: tp x pp (1: the instance actor runs the model itself)."""
        return self.engine.parallelism.world_size


class LaunchConfig(msgspec.Struct, frozen=True):
    """What to start. ``decode`` holds the engine instances in colocated mode. ``more_decode``:
    further decode pools, each of its own shape (tp, pp) and resources, in one decode service
    (dispatch and live migration span all of them; disaggregated mode only)."""

    name: str
    model_dir: str
    decode: InstanceGroup
    prefill: InstanceGroup | None = None
    more_decode: tuple[InstanceGroup, ...] = ()
    mode: str = "disaggregated"
    transfer_backend: str = "ray"
    transfer_timeout_s: float = 30.0
    request_timeout_s: float = 600.0  # the router times out any request older than this
    max_requests: int = 20_000  # beyond this many requests in flight, submit raises Overloaded
    health_timeout_s: float = 10.0  # an instance silent this long is taken out of service
    recompute_lost: bool = False  # requests a lost instance held are recomputed elsewhere
    result_ttl_s: float = 60.0  # how long the router keeps a finished request nobody reads
    prefill_policy: str = "least_tokens"
    decode_policy: str = "most_free_blocks"
    migration: MigrationSpec = MigrationSpec()  # live migration between decode instances


def instance_bundle(group: InstanceGroup) -> dict[str, float]:
    """The Ray resources one model worker of ``group`` reserves (one placement-group bundle)."""
    bundle = {"CPU": group.num_cpus}
    if group.num_gpus:
        bundle["GPU"] = group.num_gpus
    return bundle


def instance_bundles(group: InstanceGroup) -> list[dict[str, float]]:
    """One instance's placement group: a bundle per model worker (the controller of a parallel
    instance shares the first bundle and reserves nothing of its own)."""
    return [instance_bundle(group) for _ in range(group.workers)]


def decode_groups(config: LaunchConfig) -> tuple[InstanceGroup, ...]:
    """Every pool of decode instances (the engine instances in colocated mode)."""
    return (config.decode, *config.more_decode)


def instance_groups(config: LaunchConfig) -> dict[str, dict[str, InstanceGroup]]:
    """Each instance's Ray actor name and pool, by role. The launcher names them so, and a
    restarted router finds them again by these names; decode instances are numbered across pools."""
    num_prefill = config.prefill.replicas if config.mode == "disaggregated" and config.prefill else 0
    prefill = {f"{config.name}-prefill-{i}": config.prefill for i in range(num_prefill)}
    pools = [group for group in decode_groups(config) for _ in range(group.replicas)]
    decode = {f"{config.name}-decode-{i}": group for i, group in enumerate(pools)}
    return {"prefill": prefill, "decode": decode}


def instance_names(config: LaunchConfig) -> dict[str, list[str]]:
    """The Ray actor names of a launch's instances by role."""
    return {role: list(groups) for role, groups in instance_groups(config).items()}


def pool_of_instance(config: LaunchConfig) -> dict[str, InstanceGroup]:
    """Every instance's pool, by its name (prefill and decode together)."""
    return {name: group for groups in instance_groups(config).values() for name, group in groups.items()}


def router_name(cluster_name: str) -> str:
    return f"{cluster_name}-router"
