"""Goodput: the highest arrival rate at which a deployment still meets the attainment target.

Found by bracketing then bisection on the rate, every probe a simulation over the same base trace.
The probe sequence depends only on the start rate and the pass/fail outcomes, so if every rate that
passes a tight SLO also passes a looser one, the tight goodput is never above the loose one.
"""
from __future__ import annotations

import math
from typing import Callable

import msgspec

from .sim_core import SimResult, SimulationError


class Goodput(msgspec.Struct, frozen=True):
    """Result of a goodput search; ``result`` is the simulation at ``rate`` (None when rate is 0)."""

    rate: float
    result: SimResult | None
    probes: int


def find_goodput(simulate: Callable[[float], SimResult], target: float, start: float,
                 cap: float = math.inf, rel_tol: float = 0.03, max_doublings: int = 12) -> Goodput:
    """Largest rate r <= cap (within ``rel_tol``) with simulate(r).attainment >= target.

    ``cap`` is the saturation throughput: above it queues grow without bound, which a finite
    run may not show when the TPOT target tolerates seconds of queueing amortised over many
    tokens. ``start`` and ``cap`` must not depend on the SLO, to keep results monotone in it.
    A probe that raises SimulationError counts as a failure.
    """
    probes = 0

    def passes(rate: float) -> SimResult | None:
        nonlocal probes
        if rate > cap:
            return None
        probes += 1
        try:
            result = simulate(rate)
        except SimulationError:
            return None
        return result if result.attainment >= target else None

    best = passes(start)
    lo, hi = (start, 0.0) if best else (0.0, start)
    if best:  # grow until a failure brackets the goodput
        for _ in range(max_doublings):
            candidate = passes(lo * 2)
            if candidate is None:
                hi = lo * 2
                break
            lo, best = lo * 2, candidate
        else:
            return Goodput(rate=lo, result=best, probes=probes)
    else:  # shrink until a pass (or give up: the SLO is out of reach even when idle)
        for _ in range(max_doublings):
            candidate = passes(hi / 2)
            if candidate is not None:
                lo, best = hi / 2, candidate
                break
            hi /= 2
        else:
            return Goodput(rate=0.0, result=None, probes=probes)
    while hi - lo > rel_tol * lo:
        mid = (lo + hi) / 2
        candidate = passes(mid)
        if candidate is None:
            hi = mid
        else:
            lo, best = mid, candidate
    return Goodput(rate=lo, result=best, probes=probes)
