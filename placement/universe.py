"""Candidate deployments of DistServe's two algorithms, each with an optimistic estimate.

Every candidate carries the estimate DistServe's Algorithm 1 would assign it: replicas times
per-instance goodput, the weaker phase bounding, min(n * g_prefill, m * g_decode). The search
simulates candidates whole in decreasing order of that estimate and clips each simulated goodput
to it, so the estimate is a true upper bound and branch-and-bound returns the exact optimum.

Dominated candidates are never generated: adding instances of the phase that already has surplus
goodput only adds devices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .candidates import (PhaseName, Shape, divisors, legal_shapes, pack_high_affinity,
                         pack_low_affinity)
from .evaluate import Deployment, Evaluator
from .problem import Problem


@dataclass(frozen=True)
class Candidate:
    """n prefill and m decode instances of given shapes; ``inter`` > 0 marks Algorithm 2's layout
    (groups of ``inter`` nodes, ``n // groups`` prefill and ``m // groups`` decode per group)."""

    estimate: float
    prefill: Shape
    decode: Shape
    n: int
    m: int
    inter: int = 0
    groups: int = 0

    @property
    def devices(self) -> int:
        return self.n * self.prefill.devices + self.m * self.decode.devices

    def deployment(self, problem: Problem) -> Deployment | None:
        """Map onto nodes; None when the instances do not pack."""
        if self.inter == 0:
            placed = pack_high_affinity(problem.cluster, self.prefill, self.n, self.decode, self.m)
            if placed is None:
                return None
            return Deployment("high-affinity", self.prefill, self.decode, placed[0], placed[1])
        placed = pack_low_affinity(problem.cluster, self.inter, self.prefill, self.n // self.groups,
                                   self.decode, self.m // self.groups, self.groups)
        return Deployment("low-affinity", self.prefill, self.decode, placed[0], placed[1])


def phase_goodputs(ev: Evaluator, phase: str, shapes: list[Shape],
                   cross: Callable[[Shape], bool]) -> dict[Shape, float]:
    """Single-instance goodput of every shape; shapes that cannot meet the SLO are dropped."""
    rates = {s: ev.phase_goodput(phase, s, cross(s)).rate for s in shapes}
    return {s: r for s, r in rates.items() if r > 0}


def high_affinity(problem: Problem, ev: Evaluator, pre: list[Shape], dec: list[Shape]
                  ) -> list[Candidate]:
    """Algorithm 1: any prefill shape with any decode shape, any replica counts that fit."""
    cluster = problem.cluster
    spans = lambda s: s.devices > cluster.devices_per_node  # noqa: E731  (pipeline crosses nodes)
    gp = phase_goodputs(ev, "prefill", pre, spans)
    gd = phase_goodputs(ev, "decode", dec, spans)
    out = []
    for p, g_p in gp.items():
        for d, g_d in gd.items():
            for n in range(1, (cluster.devices - d.devices) // p.devices + 1):
                m_sat = math.ceil(n * g_p / g_d)  # beyond this, decode has surplus
                m_max = (cluster.devices - n * p.devices) // d.devices
                for m in range(1, min(m_sat, m_max) + 1):
                    if n > math.ceil(m * g_d / g_p):
                        continue  # prefill has surplus: dominated by n - 1
                    out.append(Candidate(min(n * g_p, m * g_d), p, d, n, m))
    return out


def _segments(problem: Problem, phase: PhaseName, inter: int) -> list[Shape]:
    """Instance shapes whose per-node segment (tp x pp/inter devices) fits on one node."""
    dpn = problem.cluster.devices_per_node
    legal = legal_shapes(problem, phase, max_devices=inter * dpn)
    return [s for s in legal if s.pp % inter == 0 and s.tp * (s.pp // inter) <= dpn]


def low_affinity(problem: Problem, ev: Evaluator) -> list[Candidate]:
    """Algorithm 2: ``inter``-node pipelines whose matching prefill and decode segments share a
    node; per node k_p prefill and k_d decode segments; groups of ``inter`` nodes replicated."""
    cluster, dpn, out = problem.cluster, problem.cluster.devices_per_node, []
    for inter in [d for d in divisors(problem.model.layers) if d <= cluster.nodes]:
        cross = lambda s: inter > 1  # noqa: E731
        gp = phase_goodputs(ev, "prefill", _segments(problem, "prefill", inter), cross)
        gd = phase_goodputs(ev, "decode", _segments(problem, "decode", inter), cross)
        for p, g_p in gp.items():
            for d, g_d in gd.items():
                seg_p, seg_d = p.devices // inter, d.devices // inter
                for k_p in range(1, (dpn - seg_d) // seg_p + 1):
                    for k_d in range(1, (dpn - k_p * seg_p) // seg_d + 1):
                        if k_d > math.ceil(k_p * g_p / g_d) or k_p > math.ceil(k_d * g_d / g_p):
                            continue  # one phase has surplus: dominated
                        group = min(k_p * g_p, k_d * g_d)
                        for groups in range(1, cluster.nodes // inter + 1):
                            out.append(Candidate(groups * group, p, d, groups * k_p, groups * k_d,
                                                 inter, groups))
    return out


def objective(value: float, devices: int, rate: float | None) -> tuple[bool, float, float]:
    """Sort key of a deployment serving ``value`` req/s on ``devices``: with a target rate, those
    reaching it by goodput per device (then fewer devices); otherwise by total goodput (then per
    device). Non-decreasing in ``value``, so an upper bound on value bounds the key."""
    if rate is not None and value >= rate:
        return (True, value / devices, -devices)
    return (False, value, value / devices)
