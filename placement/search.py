"""Placement search: DistServe's two algorithms, replica counts included, by joint simulation.

1. Prune shapes by divisibility and memory (candidates.py); explain if nothing fits.
2. Choose the algorithm by the inter-node link: high node-affinity (Algorithm 1: any shapes, any
   node mapping) when moving a prompt's KV across nodes costs no more than a decode step, else
   low node-affinity (Algorithm 2: pipeline segments of both phases co-located per node).
3. Per-phase goodput of every legal shape, one isolated instance each (the DistServe step), gives
   each candidate deployment its estimate min(n * g_prefill, m * g_decode).
4. Branch and bound: simulate whole deployments (router, KV transfer over the mapped links, decode
   memory, joint TTFT+TPOT attainment) in decreasing estimate order; a deployment's value is its
   joint goodput clipped to its estimate; stop once no remaining estimate can beat the best value.
   Because the value never exceeds the estimate the result is the exact optimum over all
   candidates (unless ``search.max_joint`` simulations run out first; ``SearchResult.exact`` says).
   With the SLO-independent probing in goodput.py and evaluate.py this makes the optimum
   non-increasing as SLOs tighten and non-decreasing as nodes are added.
"""
from __future__ import annotations

import time

from .candidates import PhaseName, Shape, legal_shapes, memory_explanation
from .evaluate import Deployment, Evaluator
from .goodput import Goodput
from .plan import ColocatedBaseline, Plan, SearchResult
from .problem import Problem
from .results import baseline, build_plan
from .universe import Candidate, high_affinity, low_affinity, objective


class PlacementError(ValueError):
    """No deployment can serve the problem; the message says why in the user's terms."""


def choose_algorithm(problem: Problem, ev: Evaluator, decode_shapes: list[Shape]) -> str:
    """High node-affinity when moving a mean prompt's KV over one NIC costs no more than one
    decode step of the smallest decode instance. The rule looks at neither the SLO nor the node
    count, so tightening an SLO or adding nodes never switches algorithm."""
    if problem.search.algorithm != "auto":
        return problem.search.algorithm
    smallest = min(decode_shapes, key=lambda s: (s.devices, s.tp))
    fixed, per_token = ev.transfer(Shape(1, 1), Shape(1, 1), local=False)
    step = ev.step(smallest, False).decode(1, int(ev.mean_in))
    return "high-affinity" if fixed + per_token * ev.mean_in <= step else "low-affinity"


class Evaluated:
    """A simulated candidate: its deployment, joint goodput, and value (joint clipped)."""

    def __init__(self, candidate: Candidate, deployment: Deployment, joint: Goodput) -> None:
        self.candidate = candidate
        self.deployment = deployment
        self.joint = joint
        self.value = min(joint.rate, candidate.estimate)


def branch_and_bound(problem: Problem, ev: Evaluator, universe: list[Candidate]
                     ) -> tuple[list[Evaluated], bool]:
    """Simulate candidates best-estimate first until no estimate beats the best value.

    Returns every simulated candidate and whether the search completed (exact optimum).
    """
    rate = problem.workload.rate
    order = sorted(universe, key=lambda c: (objective(c.estimate, c.devices, rate), -c.n - c.m),
                   reverse=True)
    done: list[Evaluated] = []
    best = None
    for cand in order:
        bound = objective(cand.estimate, cand.devices, rate)
        if best is not None and bound <= best:
            return done, True
        dep = cand.deployment(problem)
        if dep is None:
            continue  # does not pack onto the nodes
        if len(done) >= problem.search.max_joint:
            return done, False
        done.append(Evaluated(cand, dep, ev.joint_goodput(dep)))
        key = objective(done[-1].value, dep.devices, rate)
        if done[-1].value > 0 and (best is None or key > best):
            best = key
    return done, True


def runners_up(problem: Problem, ev: Evaluator, universe: list[Candidate],
               done: list[Evaluated]) -> list[Evaluated]:
    """Simulate the best-estimate candidates of shape pairs not simulated yet, so the output can
    show what the plan beat (``search.alternatives`` of them)."""
    rate = problem.workload.rate
    seen = {(e.candidate.prefill, e.candidate.decode) for e in done}
    extra: list[Evaluated] = []
    for cand in sorted(universe, key=lambda c: (objective(c.estimate, c.devices, rate), -c.n - c.m),
                       reverse=True):
        if len(extra) >= problem.search.alternatives:
            break
        if (cand.prefill, cand.decode) in seen:
            continue
        dep = cand.deployment(problem)
        if dep is not None:
            seen.add((cand.prefill, cand.decode))
            extra.append(Evaluated(cand, dep, ev.joint_goodput(dep)))
    return extra


def _legal(problem: Problem, phase: PhaseName) -> list[Shape]:
    shapes = legal_shapes(problem, phase)
    if not shapes:
        raise PlacementError(memory_explanation(problem, phase))
    return shapes


def search(problem: Problem) -> SearchResult:
    """Find the deployment with the best goodput per device; PlacementError if none can serve."""
    started = time.perf_counter()
    ev = Evaluator(problem)
    pre, dec = _legal(problem, "prefill"), _legal(problem, "decode")
    algorithm = choose_algorithm(problem, ev, dec)
    universe = high_affinity(problem, ev, pre, dec) if algorithm == "high-affinity" \
        else low_affinity(problem, ev)
    if not universe:
        raise PlacementError(unreachable(problem, ev, pre, dec))
    done, exact = branch_and_bound(problem, ev, universe)
    done += runners_up(problem, ev, universe, done)
    rate = problem.workload.rate
    ranked = sorted((e for e in done if e.value > 0),
                    key=lambda e: objective(e.value, e.deployment.devices, rate), reverse=True)
    if not ranked:
        raise PlacementError("no deployment reaches the attainment target at any rate: "
                             + unreachable(problem, ev, pre, dec))
    plans = [build_plan(problem, ev, e.deployment, e.value, e.joint) for e in ranked[:6]]
    colocated = baseline(problem, ev, plans[0])
    return SearchResult(plan=plans[0], alternatives=tuple(plans[1:]), baseline=colocated,
                        mode=choose_mode(problem, plans[0], colocated),
                        elapsed_s=time.perf_counter() - started, simulations=ev.simulations,
                        joint_searches=len(done), exact=exact)


def choose_mode(problem: Problem, plan: Plan, colocated: ColocatedBaseline | None) -> str:
    """``colocated`` when the colocated deployment ranks above the best disaggregated plan by the
    search's own objective (DistServe picks whichever placement serves the most goodput per
    device; on some hosts and SLOs that is not disaggregation) with ``MODE_MARGIN`` to spare, so
    that two simulations within their own noise of each other do not switch the mode."""
    if colocated is None or colocated.goodput <= 0:
        return "disaggregated"
    rate = problem.workload.rate
    discounted = objective(colocated.goodput / MODE_MARGIN, colocated.devices, rate)
    return "colocated" if discounted > objective(plan.goodput, plan.devices, rate) else "disaggregated"


MODE_MARGIN = 1.1  # colocated must serve 10% more than the plan to be chosen


def unreachable(problem: Problem, ev: Evaluator, pre: list[Shape], dec: list[Shape]) -> str:
    """Explain an SLO nobody meets, in terms of the fastest shape's idle latency."""
    slo, mean_in = problem.slo, ev.mean_in

    def ttft(s: Shape) -> float:
        return ev.step(s, False).prefill(1, int(mean_in), mean_in**2)[0]

    def tpot(s: Shape) -> float:
        return ev.step(s, False).decode(1, int(mean_in))
    fp, fd = min(pre, key=ttft), min(dec, key=tpot)
    return (f"SLO unreachable at any rate: even idle, a mean-length prompt ({mean_in:.0f} tokens) "
            f"takes {ttft(fp) * 1000:.1f} ms to prefill on the fastest instance (tp={fp.tp}, "
            f"pp={fp.pp}) against TTFT {slo.ttft_ms:g} ms, and one decode step takes "
            f"{tpot(fd) * 1000:.1f} ms (tp={fd.tp}, pp={fd.pp}) against TPOT {slo.tpot_ms:g} ms, "
            f"with {slo.attainment:.0%} of requests required to meet both")
