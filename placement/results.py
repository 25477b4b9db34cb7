"""Turn evaluated deployments into Plans, and price the colocated baseline."""
from __future__ import annotations

from .candidates import Shape, kv_is_local, legal_shapes
from .evaluate import Deployment, Evaluator
from .goodput import Goodput
from .plan import ColocatedBaseline, PhasePlan, Plan
from .problem import Problem


def build_plan(problem: Problem, ev: Evaluator, dep: Deployment, value: float,
               joint: Goodput) -> Plan:
    """A Plan for ``dep`` worth ``value`` req/s, with latencies simulated at the target rate when
    the plan meets it, else at ``value``."""
    target = problem.workload.rate
    meets = target is not None and value >= target
    at = target if meets and target is not None else value
    result = joint.result if joint.result is not None and joint.rate == at else ev.simulate(dep, at)
    return Plan(
        model=problem.model.name, hardware=problem.hardware.name, dtype=problem.dtype,
        algorithm=dep.algorithm,
        prefill=PhasePlan(dep.prefill.tp, dep.prefill.pp, len(dep.prefill_at), dep.prefill_at),
        decode=PhasePlan(dep.decode.tp, dep.decode.pp, len(dep.decode_at), dep.decode_at),
        devices=dep.devices, cluster_devices=problem.cluster.devices, slo=problem.slo,
        goodput=value, goodput_per_device=value / dep.devices, joint_goodput=joint.rate,
        target_rate=target, meets_target=meets, rate=result.rate, attainment=result.attainment,
        ttft_attainment=result.ttft_attainment, tpot_attainment=result.tpot_attainment,
        ttft=result.ttft_pct, tpot=result.tpot_pct, decode_affinity=_affinity(problem, dep),
    )


def _affinity(problem: Problem, dep: Deployment) -> tuple[tuple[int, ...], ...]:
    if dep.algorithm != "low-affinity":
        return ()
    layers = problem.model.layers
    return tuple(tuple(j for j, dst in enumerate(dep.decode_at) if kv_is_local(src, dst, layers))
                 for src in dep.prefill_at)


def colocated_shapes(problem: Problem) -> list[Shape]:
    """Colocated instances stay inside a node; like the baseline systems we compare against
    (vLLM-style serving) they use tensor parallelism only, unless only pipelines fit."""
    dpn = problem.cluster.devices_per_node
    shapes = [s for s in legal_shapes(problem, "colocated") if s.devices <= dpn]
    tp_only = [s for s in shapes if s.pp == 1]
    return tp_only or shapes


def baseline(problem: Problem, ev: Evaluator, plan: Plan) -> ColocatedBaseline | None:
    """Best colocated shape by single-instance goodput per device, replicated onto as many
    devices as the plan uses, and simulated as a whole behind a least-loaded router. Like the
    plan's value, the result is capped at replicas x single-instance goodput, so neither side
    gets credit for pooling that the other is denied."""
    shapes = colocated_shapes(problem)
    if not shapes:
        return None
    single = {s: ev.colocated_goodput(s, 1) for s in shapes}
    best = max(shapes, key=lambda s: (single[s].rate / s.devices, -s.devices))
    replicas = max(1, min(plan.devices, problem.cluster.devices) // best.devices)
    joint = single[best] if replicas == 1 else ev.colocated_goodput(best, replicas)
    value = min(joint.rate, replicas * single[best].rate)
    devices = replicas * best.devices
    return ColocatedBaseline(tp=best.tp, pp=best.pp, replicas=replicas, devices=devices,
                             goodput=value, goodput_per_device=value / devices)
