"""Launcher: a LaunchConfig -> placement groups -> instance actors -> a registered router.

Every instance gets its own placement group of one bundle (its CPUs, and a cuda instance's GPU or
GPU share), so Ray reserves them before any model loads; a launch the cluster can never hold
fails before anything starts (``cluster/preflight.py``), naming what is short.
"""
from __future__ import annotations

import logging
import re
import time

import msgspec
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tandem.cluster.client import Client
from tandem.cluster.launcher_config import (NAMESPACE, InstanceGroup, LaunchConfig, instance_bundles,
                                            instance_groups, instance_names, router_name)
from tandem.cluster.preflight import Capacity, shortfall
from tandem.cluster.router import Router
from tandem.decode.actor import DecodeActor
from tandem.engine.engine import EngineConfig
from tandem.prefill.actor import PrefillActor
from tandem.transfer.hosting import openmp_options
from tandem.transfer.protocol import remote_cause

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The cluster could not be started; nothing it started is left running."""


class Cluster:
    """A running deployment: its router, instances and placement groups."""

    def __init__(self, config: LaunchConfig, router, actors: dict, groups: list) -> None:
        self.config, self.router, self.actors, self.groups = config, router, actors, groups
        self.planned = None  # the PlannedSpec when from_spec planned an auto spec

    @classmethod
    def launch(cls, config: LaunchConfig, *, detach: bool = False, timeout_s: float = 300.0) -> "Cluster":
        if config.more_decode and config.mode != "disaggregated":
            raise LaunchError("more_decode: several decode pools need disaggregated mode")
        short = shortfall(config, ray_capacity(), _model_shape(config))
        if short is not None:  # before anything starts: nothing to clean up, no wait
            raise LaunchError(f"cluster {config.name!r} cannot start: {short}")
        lifetime = "detached" if detach else None
        cluster = cls(config, None, {}, [])
        try:
            cluster.router = Router.options(
                name=router_name(config.name), namespace=NAMESPACE, lifetime=lifetime,
                max_concurrency=router_concurrency(config)).remote(config)
            prefill, decode = cluster._start_pools(lifetime, timeout_s)
            ray.get(cluster.router.register.remote(prefill, decode), timeout=timeout_s)
        except BaseException as exc:
            cluster.shutdown()  # a failure or Ctrl-C: nothing this launch started is left behind
            if not isinstance(exc, Exception):
                raise
            log.info("cluster %r failed to start", config.name, exc_info=exc)  # the full remote error
            raise LaunchError(f"cluster {config.name!r} failed to start: {_reason(exc)}") from exc
        return cluster

    def _start_pools(self, lifetime, timeout_s: float) -> tuple[dict, dict]:
        config = self.config
        names = instance_names(config)
        prefill: dict = {}
        if names["prefill"]:
            engine = msgspec.structs.replace(
                config.prefill.engine,
                scheduler=msgspec.structs.replace(config.prefill.engine.scheduler, enable_decode=False))
            for name in names["prefill"]:
                prefill[name] = self._start(PrefillActor, name, config.prefill, lifetime, timeout_s,
                                            engine, config.transfer_backend)
        elif config.mode == "disaggregated":
            raise ValueError("disaggregated mode needs a prefill group")
        decode = {}
        for name, group in instance_groups(config)["decode"].items():
            decode[name] = self._start(DecodeActor, name, group, lifetime, timeout_s, group.engine,
                                       (config.transfer_backend,), transfer_timeout_s=config.transfer_timeout_s)
        return prefill, decode

    def _start(self, actor_cls, name: str, group: InstanceGroup, lifetime, timeout_s: float,
               engine: EngineConfig, transport, **kwargs):
        bundles = instance_bundles(group)
        pg = placement_group(bundles, strategy=group.strategy, name=name, lifetime=lifetime)
        self.groups.append(pg)
        if not _wait_placed(pg, timeout_s):
            free = ray.available_resources()
            raise LaunchError(f"could not reserve {_describe(bundles)} for {name}: the Ray cluster has "
                              f"{free.get('CPU', 0):g} CPU and {free.get('GPU', 0):g} GPU free")
        # A parallel instance's controller holds no model: its workers take the bundles' resources.
        parallel = group.workers > 1
        handle = actor_cls.options(
            name=name, namespace=NAMESPACE, lifetime=lifetime, num_cpus=0 if parallel else group.num_cpus,
            num_gpus=0 if parallel else group.num_gpus, max_restarts=group.max_restarts,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
            **openmp_options(1 if parallel else group.num_threads),
        ).remote(name, self.config.model_dir, engine, router_name(self.config.name), transport,
                 num_threads=group.num_threads, restart_on_failure=group.max_restarts > 0,
                 router_namespace=NAMESPACE, worker_cpus=group.num_cpus, worker_gpus=group.num_gpus,
                 **kwargs)
        self.actors[name] = handle
        return handle

    @classmethod
    def from_spec(cls, spec, *, detach: bool = False, timeout_s: float = 300.0) -> "Cluster":
        """Launch a validated ClusterSpec (see cluster/spec.py). An auto spec is planned first,
        against this Ray cluster's size (``plan_on_ray``); no actor starts if that fails."""
        from tandem.cluster.deployment import launch_config, model_directory

        planned = plan_on_ray(spec) if spec.needs_planning else None
        if planned is not None:
            spec = planned.spec
        cluster = cls.launch(launch_config(spec, str(model_directory(spec))), detach=detach,
                             timeout_s=timeout_s)
        cluster.planned = planned
        return cluster

    def client(self, timeout_s: float = 600.0) -> Client:
        return Client(self.router, timeout_s)

    def stats(self) -> dict:
        return ray.get(self.router.stats.remote(), timeout=60)

    def shutdown(self, grace_s: float = 10.0) -> None:
        # Ask instances to stop first: killed processes cannot release what lives outside them
        # (shared-memory KV pools, NCCL communicators). Then kill everything, stuck or not.
        stopping = [handle.shutdown.remote() for handle in self.actors.values()]
        if stopping:
            ray.wait(stopping, num_returns=len(stopping), timeout=grace_s)
        for handle in [*self.actors.values(), self.router]:
            if handle is not None:
                ray.kill(handle, no_restart=True)
        for pg in self.groups:
            remove_placement_group(pg)
        self.actors.clear()
        self.groups.clear()


def _describe(bundles: list[dict[str, float]]) -> str:
    return str(bundles[0]) if len(bundles) == 1 else f"{len(bundles)} x {bundles[0]}"


def router_concurrency(config: LaunchConfig) -> int:
    """The router actor's concurrent calls: room for a waiting poll or result call per request
    at the limit and its submit, so the instances' step reports never queue behind clients'
    long polls."""
    return 2 * config.max_requests + 1024


def plan_on_ray(spec):
    """Plan an auto ClusterSpec for the connected Ray cluster (unless ``planning.cluster`` says
    otherwise): a PlannedSpec whose ``spec`` is explicit. Logs the plan in one line; SpecError
    (naming the field, or ``placement`` with the planner's reason) when nothing can serve it."""
    from tandem.cluster.autoplace import cluster_from_nodes, needs_cluster_size, plan_spec, summary

    size = None
    if needs_cluster_size(spec):
        size = cluster_from_nodes(spec, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    planned = plan_spec(spec, size)
    log.info("%s", summary(spec.name, planned.result))
    return planned


def shutdown_by_name(name: str) -> list[str]:
    """Stop a (detached) cluster started elsewhere, found by its actors' and placement groups'
    names, so a dead router is no obstacle; returns the actors it stopped. LookupError if
    nothing of it runs."""
    actors = _cluster_members([a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                               if a.get("namespace") == NAMESPACE], name)
    groups = _cluster_members([g["name"] for g in ray.util.placement_group_table().values()
                               if g.get("state") != "REMOVED"], name)
    if not actors and not groups:
        raise LookupError(f"no tandem cluster named {name!r} in namespace {NAMESPACE!r}")
    instances = [a for a in actors if a != router_name(name)]
    _stop_gracefully(instances)
    stopped = []
    for actor_name in actors:
        try:
            ray.kill(ray.get_actor(actor_name, namespace=NAMESPACE), no_restart=True)
            stopped.append(actor_name)
        except ValueError:
            pass
    for group_name in groups:
        try:
            remove_placement_group(ray.util.get_placement_group(group_name))
        except ValueError:
            pass
    return stopped


def _cluster_members(names: list[str], cluster_name: str) -> list[str]:
    """Those of ``names`` that belong to the cluster: its router and its numbered instances."""
    pattern = re.compile(rf"{re.escape(cluster_name)}-(router|(prefill|decode)-\d+)")
    return sorted({n for n in names if n and pattern.fullmatch(n)})


def _stop_gracefully(actor_names: list[str], grace_s: float = 10.0) -> None:
    """Let named instances release shared memory before they are killed (best effort)."""
    stopping = []
    for actor_name in actor_names:
        try:
            stopping.append(ray.get_actor(actor_name, namespace=NAMESPACE).shutdown.remote())
        except ValueError:  # already gone
            pass
    if stopping:
        ray.wait(stopping, num_returns=len(stopping), timeout=grace_s)


def connect(name: str, timeout_s: float = 600.0) -> Client:
    """A client for a cluster started elsewhere (e.g. `tandem serve --detach`)."""
    try:
        router = ray.get_actor(router_name(name), namespace=NAMESPACE)
    except ValueError as exc:
        raise LookupError(f"no tandem cluster named {name!r} in namespace {NAMESPACE!r}") from exc
    return Client(router, timeout_s)


def ray_capacity() -> Capacity:
    """The connected Ray cluster's CPUs, GPUs and memory over its live nodes."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    memory = [r.get("memory", 0.0) + r.get("object_store_memory", 0.0) for r in nodes]
    return Capacity(cpus=sum(r.get("CPU", 0.0) for r in nodes),
                    largest_node_cpus=max((r.get("CPU", 0.0) for r in nodes), default=0.0),
                    gpus=sum(r.get("GPU", 0.0) for r in nodes),
                    largest_node_gpus=max((r.get("GPU", 0.0) for r in nodes), default=0.0),
                    memory_bytes=sum(memory), largest_node_memory_bytes=max(memory, default=0.0))


def _model_shape(config: LaunchConfig):
    from tandem.placement.model_spec import load_model

    try:
        return load_model(config.model_dir)
    except ValueError as exc:
        raise LaunchError(f"cluster {config.name!r} cannot start: model: {exc}") from None


def _wait_placed(pg, timeout_s: float) -> bool:
    """Wait for a placement group in one-second slices, so Ctrl-C is handled between them."""
    deadline = time.monotonic() + timeout_s
    while not pg.wait(timeout_seconds=1):
        if time.monotonic() > deadline:
            return False
    return True


def _reason(exc: BaseException) -> str:
    """The cause of a failed launch in one line: the remote exception's message, or for an actor
    whose constructor raised, the exception line that ends Ray's report (its traceback is logged)."""
    cause = remote_cause(exc)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    if not lines:
        return type(cause).__name__
    if "creation task" in lines[0]:
        return lines[-1]
    return lines[0]
