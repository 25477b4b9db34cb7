"""``placement: auto``: a cluster spec becomes a placement problem, the plan becomes an explicit spec.

    planned = plan_spec(spec, cluster_from_nodes(spec, node_resources))
    Cluster.launch(launch_config(planned.spec, model_dir))

The cluster spec already says most of what the planner needs (model and dtype, SLOs, the pools'
batching limits and block size); ``planning:`` adds the rest (hardware, calibration, cluster size,
workload, search knobs) in the placement spec's own schema, and ``placement.problem_from_dict``
parses the combination, so the two spec formats share one parser. The planner chooses replicas,
tp and pp per phase; for CPU pools tp and pp stay 1 unless ``planning.search.max_tp``/``max_pp``
allow more (``_search_options``). The pools' batching
limits and block size become its policy; each simulated instance's KV capacity comes from the
hardware profile's memory, not from ``num_blocks``, which is only checked to hold the workload's
longest request (``_check_pool_blocks``); ``memory_fraction`` is not read.

Pure: no Ray, no torch. The launcher (cluster/launcher.py) asks Ray how big the cluster is and
passes the answer in; ``tandem plan`` passes this host's size instead.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import msgspec

from tandem.cluster.spec_check import check_model, check_spec
from tandem.cluster.spec_types import ClusterSpec, PlanningCluster, PlanningSpec, SpecError
from tandem.placement.candidates import required_kv_blocks
from tandem.placement.plan import ColocatedBaseline, Plan, SearchResult, mode_reason
from tandem.placement.problem import Problem, problem_from_dict
from tandem.placement.problem import SpecError as ProblemError
from tandem.placement.search import PlacementError, search
from tandem.placement.sim_core import SimulationError

# Placement policy fields the pools already fix, and the pool field each one mirrors.
_POOL_POLICY = {
    "prefill_token_budget": ("prefill", "max_batch_tokens"),
    "prefill_max_batch": ("prefill", "max_num_seqs"),
    "decode_max_batch": ("decode", "max_num_seqs"),
    "block_size": ("prefill", "block_size"),
}

# Error paths of the problem's sections that come from the cluster spec, not from `planning:`.
_OWN_SECTIONS = {"planning.model": "model", "planning.dtype": "model.dtype", "planning.slo": "slo"}


class PlannedSpec(msgspec.Struct, frozen=True):
    """An auto spec after planning: the explicit spec to launch and the search that chose it."""

    spec: ClusterSpec
    result: SearchResult


def plan_spec(spec: ClusterSpec, cluster: PlanningCluster | None = None) -> PlannedSpec:
    """Plan an auto spec. ``cluster`` sizes the search unless ``planning.cluster`` is given.
    SpecError names the field at fault, or ``placement`` when no deployment can serve the SLOs
    (with the planner's explanation)."""
    problem = planning_problem(spec, cluster)
    _check_pool_blocks(spec, problem)
    try:
        result = search(problem)
    except (PlacementError, SimulationError) as exc:
        raise SpecError("placement", f"auto placement found no feasible deployment: {exc}") from None
    if result.mode == "colocated":
        if (spec.planning or PlanningSpec()).allow_colocated:
            assert result.baseline is not None  # the mode is colocated only beside one
            return PlannedSpec(spec=fill_colocated_spec(spec, result.baseline), result=result)
        result = msgspec.structs.replace(result, mode="disaggregated")
    return PlannedSpec(spec=fill_spec(spec, result.plan), result=result)


def planning_problem(spec: ClusterSpec, cluster: PlanningCluster | None = None) -> Problem:
    """The placement problem an auto spec poses (see ``plan_spec`` for ``cluster``)."""
    check_plannable(spec)
    planning = spec.planning or PlanningSpec()
    if planning.workload is None:
        raise SpecError("planning.workload", "required to plan placement: auto (arrival rate and "
                                             "request lengths, as in a placement spec's workload)")
    size = planning.cluster or cluster
    if size is None:
        raise SpecError("planning.cluster", "required: no Ray cluster or host to size the plan from")
    try:
        return problem_from_dict(_problem_data(spec, planning, size), where="planning")
    except ProblemError as exc:
        raise _from_problem_error(exc) from None


def check_planning(spec: ClusterSpec) -> None:
    """Parse-time validation of ``planning:`` by building the problem once, so a typo fails when
    the spec loads (with its line) rather than at launch. Needs the model's config.json: skipped,
    like the other model-aware checks, when the model is not on this machine; skipped too when
    every pool is pinned (nothing will be planned)."""
    if spec.planning is None or spec.model_check.config_path is None or not spec.needs_planning:
        return
    planning_problem(spec, spec.planning.cluster or PlanningCluster(nodes=1, devices_per_node=1))


def check_plannable(spec: ClusterSpec) -> None:
    """Refuse, naming the field, what the planner cannot plan or the engine cannot run."""
    if spec.placement != "auto":
        raise SpecError("placement", "is explicit: nothing to plan (set placement: auto)")
    if spec.mode != "disaggregated" or spec.prefill is None or spec.decode is None:
        raise SpecError("mode", "placement: auto plans disaggregated deployments only "
                                "(use mode: disaggregated, or placement: explicit)")
    if spec.slo is None:
        raise SpecError("slo", "required when placement is auto (the planner sizes the cluster to "
                               "meet it)")
    if spec.decode.device != spec.prefill.device:
        raise SpecError("decode.device", f"must equal prefill.device ({spec.prefill.device}) under "
                                         "placement: auto: the planner models one device type")
    for name, section in spec.sections.items():
        if section.replicas is not None:
            # The search has no way to hold one phase's count fixed; refusing beats ignoring it.
            raise SpecError(f"{name}.replicas", "cannot be pinned under placement: auto (the "
                                                "planner chooses it): omit it, or use placement: explicit")
        for field in ("tp", "pp"):
            value = getattr(section, field)
            if value is not None and value > 1:
                raise SpecError(f"{name}.{field}", f"cannot be pinned under placement: auto (the planner "
                                                   f"chooses it; planning.search.max_{field} bounds it): "
                                                   "omit it, or use placement: explicit")


def fill_spec(spec: ClusterSpec, plan: Plan) -> ClusterSpec:
    """The explicit spec that launches ``plan``: replicas/tp/pp filled (and ``one_node`` where
    the plan puts each instance on one node), everything else as given; ``planning`` dropped
    (explicit specs may not carry it)."""
    changes = {name: msgspec.structs.replace(getattr(spec, name), replicas=phase.replicas,
                                             tp=phase.tp, pp=phase.pp, one_node=_on_one_node(phase))
               for name, phase in (("prefill", plan.prefill), ("decode", plan.decode))}
    filled = msgspec.structs.replace(spec, placement="explicit", planning=None, **changes)
    check_spec(filled)
    return msgspec.structs.replace(filled, model_check=check_model(filled))


def _on_one_node(phase) -> bool:
    """Whether the plan puts each of a phase's multi-worker instances on one node (then the
    launch insists on it: STRICT_PACK)."""
    return phase.tp * phase.pp > 1 and bool(phase.instances) and all(
        len(instance.nodes) == 1 for instance in phase.instances)


def fill_colocated_spec(spec: ClusterSpec, chosen: ColocatedBaseline) -> ClusterSpec:
    """The explicit colocated spec the planner chose instead: one pool of ``chosen``'s instances,
    the decode section's settings (its device, memory, restarts) with the batching the planner
    simulated, and as many CPUs each as the larger of the two pools reserved (one device slot)."""
    assert spec.prefill is not None and spec.decode is not None
    batching = (dict(chunked_prefill=True, max_batch_tokens=chosen.token_budget, max_num_seqs=chosen.max_batch)
                if chosen.chunked_prefill else
                dict(max_batch_tokens=spec.prefill.max_batch_tokens, max_num_seqs=spec.decode.max_num_seqs))
    pool = msgspec.structs.replace(spec.decode, replicas=chosen.replicas, tp=chosen.tp, pp=chosen.pp,
                                   num_cpus=max(spec.prefill.num_cpus, spec.decode.num_cpus), **batching)
    filled = msgspec.structs.replace(spec, mode="colocated", placement="explicit", planning=None,
                                     prefill=None, decode=None, instances=pool)
    check_spec(filled)
    return msgspec.structs.replace(filled, model_check=check_model(filled))


def summary(name: str, result: SearchResult) -> str:
    """One line: per phase replicas x (tp, pp), predicted goodput and attainment (or, when the
    planner chose colocated instances, why)."""
    if result.mode == "colocated":
        return f"planned {name}: {mode_reason(result)}"
    plan = result.plan
    phases = ", ".join(f"{phase} {p.replicas} x (tp={p.tp}, pp={p.pp})"
                       for phase, p in (("prefill", plan.prefill), ("decode", plan.decode)))
    target = ""
    if plan.target_rate is not None:
        verdict = "meets" if plan.meets_target else "is BELOW"
        target = f"; {verdict} the target {plan.target_rate:g} req/s"
    return (f"planned {name}: {phases} on {plan.devices} of {plan.cluster_devices} {plan.hardware} "
            f"devices; predicted goodput {plan.goodput:.2f} req/s, attainment "
            f"{plan.attainment:.1%} at {plan.rate:.2f} req/s{target}")


# --- cluster size -------------------------------------------------------------------------------

def needs_cluster_size(spec: ClusterSpec) -> bool:
    """True when planning must be told the cluster's size (``planning.cluster`` is not given)."""
    return spec.planning is None or spec.planning.cluster is None


def cluster_from_nodes(spec: ClusterSpec, nodes: Sequence[Mapping[str, float]]) -> PlanningCluster:
    """Cluster size from the Ray nodes' total resources (``ray.nodes()[i]["Resources"]``): for CPU
    pools a device is one instance's ``num_cpus`` slice of a node, for cuda pools one GPU."""
    key, per_device = _device_resource(spec)
    counts = [c for c in (_slices(node.get(key, 0.0), per_device) for node in nodes) if c > 0]
    if not counts:
        raise SpecError("planning.cluster", f"no Ray node has the {per_device:g} {key} one instance "
                                            "needs: add resources or give planning.cluster")
    # The planner models identical nodes: the smallest one bounds them all.
    return PlanningCluster(nodes=len(counts), devices_per_node=min(counts))


def host_cluster(spec: ClusterSpec) -> PlanningCluster:
    """This host as the cluster (for ``tandem plan`` without Ray): one node of os.cpu_count() CPUs,
    sliced like ``cluster_from_nodes``. GPUs cannot be counted without torch: cuda pools must give
    ``planning.cluster``."""
    key, per_device = _device_resource(spec)
    if key != "CPU":
        raise SpecError("planning.cluster", "required to plan cuda pools offline (tandem cannot "
                                            "count this host's GPUs without torch)")
    return cluster_from_nodes(spec, [{"CPU": float(os.cpu_count() or 1)}])


def _device_resource(spec: ClusterSpec) -> tuple[str, float]:
    check_plannable(spec)
    if spec.decode is None or spec.decode.device == "cuda":
        return "GPU", 1.0
    # Every device slot must fit either pool's instance, so the hungrier pool sets the slice.
    per_device = max(s.num_cpus for s in spec.sections.values())
    if per_device <= 0:
        raise SpecError("planning.cluster", "required when the pools reserve no CPUs (num_cpus: 0): "
                                            "there is nothing to divide a node by")
    return "CPU", per_device


def _slices(total: float, per_device: float) -> int:
    return math.floor(total / per_device + 1e-9)  # 3 CPUs / 0.1 is 30 slices, not 29.999...


# --- the problem document -----------------------------------------------------------------------

def _problem_data(spec: ClusterSpec, planning: PlanningSpec, size: PlanningCluster) -> dict[str, Any]:
    """The placement spec (as a dict) equivalent to the cluster spec's auto sections."""
    assert spec.slo is not None and spec.prefill is not None
    config_path = spec.model_check.config_path
    if config_path is None:
        raise SpecError("model", f"the planner needs the model's config.json: "
                                 f"{spec.model_check.skipped_reason}")
    data: dict[str, Any] = {
        "model": config_path,
        "hardware": planning.hardware if planning.hardware is not None else _default_hardware(spec),
        "cluster": msgspec.to_builtins(size),
        "slo": msgspec.to_builtins(spec.slo),
        "workload": planning.workload,
        "policy": _policy(spec, planning.policy),
        "search": _search_options(planning.search, spec.prefill.device),
        "dtype": _dtype(spec, config_path),
        "calibration": planning.calibration,
    }
    return {k: v for k, v in data.items() if v is not None}


def _default_hardware(spec: ClusterSpec) -> str:
    assert spec.prefill is not None
    if spec.prefill.device == "cpu":
        return "cpu"
    raise SpecError("planning.hardware", "required for cuda pools (a profile name such as "
                                         "A100-80GB, or a custom mapping)")


def _policy(spec: ClusterSpec, given: dict[str, Any] | None) -> dict[str, Any]:
    """The planner's batching policy: the pools' own limits, plus what ``planning.policy`` adds
    (memory_utilization, watermark). Setting a pool-owned field there would let the simulated
    instances differ from the launched ones, so it is refused."""
    fixed = {key: getattr(getattr(spec, pool), field)
             for key, (pool, field) in _POOL_POLICY.items()}
    for key, (pool, field) in _POOL_POLICY.items():
        if key in (given or {}):
            raise SpecError(f"planning.policy.{key}", f"set by {pool}.{field} ({fixed[key]}): "
                                                      "change it there")
    return {**(given or {}), **fixed}


def _search_options(given: dict[str, Any] | None, device: str) -> dict[str, Any]:
    """The search knobs as given; for CPU pools tp and pp default to 1: on CPU they let a model
    larger than one process's memory run, but make one that fits slower, which the analytic model
    does not know (benchmarks/RESULTS.md, "Parallel instances"). Set ``max_tp``/``max_pp`` (ideally
    with a calibration that timed those shapes: ``tandem profile --shapes``) to let it choose."""
    options = dict(given or {})
    if device == "cpu":
        options.setdefault("max_tp", 1)
        options.setdefault("max_pp", 1)
    return options


def _dtype(spec: ClusterSpec, config_path: str) -> str | None:
    """The dtype the instances will run in, in the planner's terms. For ``auto`` this mirrors
    engine.runner.resolve_dtype (not imported: it needs torch): fp32 checkpoints stay fp32, others
    run in bf16 on CPU and in the checkpoint's dtype (None: the planner's default) on GPUs."""
    if spec.model.dtype != "auto":
        return spec.model.dtype
    try:
        torch_dtype = json.loads(Path(config_path).read_text()).get("torch_dtype")
    except (OSError, ValueError) as exc:
        raise SpecError("model", f"cannot read {config_path}: {exc}") from None
    if torch_dtype in ("float32", "torch.float32"):
        return "float32"
    assert spec.prefill is not None
    return "bfloat16" if spec.prefill.device == "cpu" else None


def _from_problem_error(exc: ProblemError) -> SpecError:
    """placement's "planning.workload.foo: unknown field" as a cluster SpecError with that field,
    mapped back to the cluster spec's own sections where they, not ``planning:``, supplied it."""
    field, _, reason = str(exc).partition(": ")
    for prefix, own in _OWN_SECTIONS.items():
        if field == prefix or field.startswith(prefix + "."):
            field = own + field[len(prefix):]
    return SpecError(field, reason or str(exc))


def _check_pool_blocks(spec: ClusterSpec, problem: Problem) -> None:
    """A pool with a fixed ``num_blocks`` must hold the workload's longest request, as the
    planner assumes every instance does."""
    for phase in ("prefill", "decode"):
        section = getattr(spec, phase)
        if section is None or section.num_blocks is None:
            continue
        need = required_kv_blocks(problem, phase)
        if section.num_blocks < need:
            raise SpecError(f"{phase}.num_blocks", f"{section.num_blocks} blocks cannot hold the "
                                                   f"workload's longest {phase} request ({need} "
                                                   "blocks): raise it or shorten planning.workload")
