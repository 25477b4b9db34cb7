"""Turn evaluated deployments into Plans, and price the colocated baseline."""
from __future__ import annotations

import msgspec

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
    """The better of two colocated deployments on as many devices as the plan: with the problem's
    own batching (whole prompts per step, unless its policy chunks) and with chunked prefill at
    token budgets sized from the TPOT target (``chunk_budgets``)."""
    shapes = colocated_shapes(problem)
    if not shapes:
        return None
    best = _colocated(problem, ev, plan, shapes)
    if problem.policy.chunked_prefill:
        return best
    for budget in chunk_budgets(problem, ev, shapes):
        chunked = _chunked_problem(problem, budget)
        other = _colocated(chunked, Evaluator(chunked), plan, shapes)
        if other.goodput_per_device > best.goodput_per_device:
            best = other
    return best


def chunk_budgets(problem: Problem, ev: Evaluator, shapes: list[Shape]) -> list[int]:
    """Step token budgets worth simulating for chunked prefill: the largest (a multiple of the
    block size) whose step, one mean-context decode beside a prompt chunk, still meets the TPOT
    target on the fastest shape, and half of it (room for a larger decode batch)."""
    bs, tpot = problem.policy.block_size, problem.slo.tpot_s
    ctx = int(ev.mean_in + ev.mean_out / 2)
    step = min((ev.step(s, False) for s in shapes), key=lambda m: m.decode(1, ctx))

    def fits(tokens: int) -> bool:
        return step.mixed(1, tokens, tokens * tokens, 1, ctx) <= tpot
    lo, hi = 1, MAX_CHUNK_BUDGET // bs  # in blocks
    if not fits(lo * bs):
        return [bs]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * bs) else (lo, mid - 1)
    return sorted({lo * bs, max(1, lo // 2) * bs}, reverse=True)


MAX_CHUNK_BUDGET = 8192


def _chunked_problem(problem: Problem, budget: int) -> Problem:
    policy = msgspec.structs.replace(problem.policy, chunked_prefill=True, prefill_token_budget=budget,
                                     decode_max_batch=min(problem.policy.decode_max_batch, budget))
    return msgspec.structs.replace(problem, policy=policy)


def _colocated(problem: Problem, ev: Evaluator, plan: Plan, shapes: list[Shape]) -> ColocatedBaseline:
    """Best colocated shape by single-instance goodput per device, replicated onto as many
    devices as the plan uses, and simulated as a whole behind a least-loaded router. Like the
    plan's value, the result is capped at replicas x single-instance goodput, so neither side
    gets credit for pooling that the other is denied."""
    single = {s: ev.colocated_goodput(s, 1) for s in shapes}
    best = max(shapes, key=lambda s: (single[s].rate / s.devices, -s.devices))
    replicas = max(1, min(plan.devices, problem.cluster.devices) // best.devices)
    joint = single[best] if replicas == 1 else ev.colocated_goodput(best, replicas)
    value = min(joint.rate, replicas * single[best].rate)
    devices = replicas * best.devices
    policy = problem.policy
    return ColocatedBaseline(tp=best.tp, pp=best.pp, replicas=replicas, devices=devices,
                             goodput=value, goodput_per_device=value / devices,
                             chunked_prefill=policy.chunked_prefill,
                             token_budget=policy.prefill_token_budget, max_batch=policy.decode_max_batch)
