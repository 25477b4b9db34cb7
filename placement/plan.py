"""The search's output: a Plan per deployment, plus the colocated baseline and a text rendering.

A Plan is what ``placement: auto`` in a cluster spec consumes: per phase the instance shape
(tp, pp), the replica count, and for every instance the node and device indices of each pipeline
stage (stage s of an instance runs layers [s*L/pp, (s+1)*L/pp) on ``tp`` devices of one node).
"""
from __future__ import annotations

import msgspec

from .sim_core import Percentiles, Slo


class StagePlacement(msgspec.Struct, frozen=True):
    """One pipeline stage: ``tp`` device indices on one node."""

    node: int
    devices: tuple[int, ...]


class InstancePlacement(msgspec.Struct, frozen=True):
    """Where one instance runs, stage by stage."""

    stages: tuple[StagePlacement, ...]

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(sorted({s.node for s in self.stages}))


class PhasePlan(msgspec.Struct, frozen=True):
    """Shape, replica count and node mapping of one phase's instances."""

    tp: int
    pp: int
    replicas: int
    instances: tuple[InstancePlacement, ...]

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.replicas


class Plan(msgspec.Struct, frozen=True):
    """A disaggregated deployment and its predicted performance.

    ``joint_goodput`` is the highest simulated arrival rate (req/s) at which at least
    ``slo.attainment`` of requests meet both TTFT and TPOT in a simulation of the whole deployment;
    ``goodput`` is that, capped by replicas x single-instance goodput of the weaker phase (what the
    search maximises; see search.py). Attainment and percentiles were simulated at ``rate``: the
    workload's target rate when the plan meets it, else ``goodput``.
    """

    model: str
    hardware: str
    dtype: str
    algorithm: str  # "high-affinity" (Algorithm 1) or "low-affinity" (Algorithm 2)
    prefill: PhasePlan
    decode: PhasePlan
    devices: int
    cluster_devices: int
    slo: Slo
    goodput: float
    goodput_per_device: float
    joint_goodput: float
    target_rate: float | None
    meets_target: bool
    rate: float
    attainment: float
    ttft_attainment: float
    tpot_attainment: float
    ttft: Percentiles
    tpot: Percentiles
    # Per prefill instance, the decode instances the router may send its requests to (their KV
    # path stays inside a node); empty: any decode instance (high node-affinity plans).
    decode_affinity: tuple[tuple[int, ...], ...] = ()


class ColocatedBaseline(msgspec.Struct, frozen=True):
    """Best colocated deployment (every instance prefills and decodes) on as many devices, with
    whole prompts per step or, if that serves more, chunked prefill (``token_budget`` tokens a
    step, ``max_batch`` running requests at most)."""

    tp: int
    pp: int
    replicas: int
    devices: int
    goodput: float
    goodput_per_device: float
    chunked_prefill: bool = False
    token_budget: int = 0
    max_batch: int = 0


class SearchResult(msgspec.Struct, frozen=True):
    """The chosen plan, the runners-up (best first), the baseline, and what the search cost.

    ``exact`` is False when ``search.max_joint`` whole-deployment searches ran out before the
    branch and bound could prove the plan optimal.
    """

    plan: Plan
    alternatives: tuple[Plan, ...]
    baseline: ColocatedBaseline | None
    elapsed_s: float
    simulations: int
    joint_searches: int
    exact: bool
    mode: str = "disaggregated"  # or "colocated": the baseline serves the objective better


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def _row(plan: Plan) -> list[str]:
    return [
        plan.algorithm,
        f"{plan.prefill.tp}/{plan.prefill.pp} x{plan.prefill.replicas}",
        f"{plan.decode.tp}/{plan.decode.pp} x{plan.decode.replicas}",
        str(plan.devices),
        f"{plan.goodput:.2f}",
        f"{plan.goodput_per_device:.3f}",
        f"{plan.attainment * 100:.1f}%",
        _ms(plan.ttft.p90),
        _ms(plan.tpot.p90),
    ]


def format_table(plans: list[Plan]) -> str:
    header = ["algorithm", "prefill tp/pp", "decode tp/pp", "devices", "goodput/s", "per device",
              "attain", "TTFT p90 ms", "TPOT p90 ms"]
    rows = [header] + [_row(p) for p in plans]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_result(result: SearchResult) -> str:
    """Human-readable summary of a search: the plan, a table of alternatives, the baseline."""
    plan = result.plan
    lines = [
        f"model {plan.model} ({plan.dtype}) on {plan.hardware}: {plan.devices} of "
        f"{plan.cluster_devices} devices, {plan.algorithm} placement",
        f"SLO: TTFT <= {plan.slo.ttft_ms:g} ms and TPOT <= {plan.slo.tpot_ms:g} ms for "
        f"{plan.slo.attainment * 100:g}% of requests",
        f"prefill: {plan.prefill.replicas} x (tp={plan.prefill.tp}, pp={plan.prefill.pp})  "
        f"decode: {plan.decode.replicas} x (tp={plan.decode.tp}, pp={plan.decode.pp})",
        f"goodput: {plan.goodput:.2f} req/s = {plan.goodput_per_device:.3f} req/s per device",
    ]
    if plan.target_rate is not None:
        verdict = "meets" if plan.meets_target else "does NOT meet"
        lines.append(f"target rate {plan.target_rate:g} req/s: plan {verdict} it")
    lines.append(f"at {plan.rate:.2f} req/s: attainment {plan.attainment * 100:.1f}% "
                 f"(TTFT {plan.ttft_attainment * 100:.1f}%, TPOT {plan.tpot_attainment * 100:.1f}%); "
                 f"TTFT p50/p90/p99 {_ms(plan.ttft.p50)}/{_ms(plan.ttft.p90)}/{_ms(plan.ttft.p99)} ms; "
                 f"TPOT p50/p90/p99 {_ms(plan.tpot.p50)}/{_ms(plan.tpot.p90)}/{_ms(plan.tpot.p99)} ms")
    for i, inst in enumerate(plan.prefill.instances):
        lines.append(f"  prefill[{i}]: " + "; ".join(f"node {s.node} dev {list(s.devices)}" for s in inst.stages))
    for i, inst in enumerate(plan.decode.instances):
        lines.append(f"  decode[{i}]: " + "; ".join(f"node {s.node} dev {list(s.devices)}" for s in inst.stages))
    lines += ["", "plan and top alternatives:", format_table([plan, *result.alternatives])]
    if result.baseline is not None:
        b = result.baseline
        ratio = plan.goodput_per_device / b.goodput_per_device if b.goodput_per_device > 0 else float("inf")
        lines.append(f"\ncolocated baseline: {b.replicas} x (tp={b.tp}, pp={b.pp}) on {b.devices} devices"
                     f"{colocated_batching(b)}: {b.goodput:.2f} req/s = {b.goodput_per_device:.3f} "
                     f"req/s per device (plan: {ratio:.2f}x per device)")
    if result.mode == "colocated":
        lines.append(mode_reason(result))
    proof = "optimal over all candidates" if result.exact else "best found (max_joint reached)"
    lines.append(f"search: {result.simulations} simulations ({result.joint_searches} whole-deployment "
                 f"goodput searches) in {result.elapsed_s:.1f} s; {proof}")
    return "\n".join(lines)


def colocated_batching(b: ColocatedBaseline) -> str:
    if not b.chunked_prefill:
        return ", whole prompts per step"
    return f", chunked prefill ({b.token_budget} tokens a step)"


def mode_reason(result: SearchResult) -> str:
    """Why the planner recommends colocated instances: both predicted goodputs."""
    b, plan = result.baseline, result.plan
    assert b is not None
    return (f"mode: colocated: {b.replicas} colocated instance(s){colocated_batching(b)} are "
            f"predicted to serve {b.goodput:.2f} req/s on {b.devices} devices "
            f"({b.goodput_per_device:.3f} per device), the best disaggregated plan "
            f"{plan.goodput:.2f} req/s on {plan.devices} ({plan.goodput_per_device:.3f} per device)")
