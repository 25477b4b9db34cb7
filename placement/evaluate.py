"""Simulation-backed measurements for the search, memoised per shape and per deployment.

Per-phase goodput (DistServe's Algorithm 1 building block) simulates one instance of a phase in
isolation: prefill judged on TTFT alone, decode (requests arriving with their KV to pull) on TPOT
alone. Joint goodput simulates a whole deployment: N prefill + M decode instances, router, KV
transfers over the links their node mapping implies, decode memory limits, joint attainment.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import msgspec

from .calibrate import CalibratedLatency
from .candidates import Shape, kv_blocks, kv_is_local
from .goodput import Goodput, find_goodput
from .latency import AnalyticLatency, StepModel, kv_transfer_cost
from .plan import InstancePlacement
from .problem import Problem
from .sim_colocated import simulate_colocated
from .sim_core import InstanceModel, SimResult, SimulationError
from .sim_disagg import simulate_disaggregated
from .workload import BaseTrace, sample_base


SATURATED = 1e9  # an arrival rate that queues every request at once


class Deployment(msgspec.Struct, frozen=True):
    """N prefill + M decode instances of fixed shapes at fixed places."""

    algorithm: str
    prefill: Shape
    decode: Shape
    prefill_at: tuple[InstancePlacement, ...]
    decode_at: tuple[InstancePlacement, ...]

    @property
    def devices(self) -> int:
        return len(self.prefill_at) * self.prefill.devices + len(self.decode_at) * self.decode.devices


class Evaluator:
    """Runs and caches the simulations a search needs for one problem.

    A simulation at rate R must outlast the requests' lifetime L or it only sees a burst being
    drained: each run gets R*L requests of warm-up and R*L of tail around the measured ones (within
    ``search.max_requests``). L comes from saturation step times, never from the SLO, so every
    SLO sees the same runs and goodput stays monotone in the SLO.
    """

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.simulations = 0
        # A served calibration's time to first token outside the model steps (every TTFT pays it).
        self.router_delay = (problem.calibration.router_delay_s or 0.0) if problem.calibration else 0.0
        s = problem.search
        self._full = sample_base(problem.workload, max(s.requests, s.max_requests), s.seed,
                                 problem.model.max_positions)
        self._traces: dict[int, BaseTrace] = {}
        self._steps: dict[tuple[Shape, bool], StepModel] = {}
        self._blocks: dict[Shape, int] = {}
        self._cache: dict[tuple, object] = {}  # capacities and goodputs, by what they measure
        base = self.trace(s.requests)
        self.mean_in = sum(base.inputs) / base.count
        self.mean_out = sum(base.outputs) / base.count

    def trace(self, count: int) -> BaseTrace:
        """The first ``count`` requests of the problem's seeded workload."""
        if count not in self._traces:
            f = self._full
            self._traces[count] = BaseTrace(f.times[:count], f.inputs[:count], f.outputs[:count])
        return self._traces[count]

    def sized(self, rate: float, lifetime: float) -> tuple[BaseTrace, tuple[int, int]]:
        """Trace and measured window for a run at ``rate`` of requests living ``lifetime`` s."""
        s = self.problem.search
        if rate >= SATURATED:  # everything queued at once: several full decode batches
            count = min(s.max_requests, max(s.requests, 4 * self.problem.policy.decode_max_batch))
            return self.trace(count), (0, count)
        span = math.ceil(rate * lifetime)
        count = min(s.max_requests, s.requests + 2 * span)
        edge = max(int(s.warmup * count), min(span, count // 4))
        return self.trace(count), (edge, count - edge)

    def step(self, shape: Shape, cross_node: bool) -> StepModel:
        key = (shape, cross_node)
        if key not in self._steps:
            p = self.problem
            model: StepModel = AnalyticLatency(p.model, p.hardware, p.dtype, shape.tp, shape.pp, cross_node)
            entry = p.calibration.entry(shape.tp, shape.pp) if p.calibration else None
            self._steps[key] = CalibratedLatency(entry, model) if entry else model
        return self._steps[key]

    def instance(self, shape: Shape, cross_node: bool) -> InstanceModel:
        if shape not in self._blocks:
            self._blocks[shape] = kv_blocks(self.problem, shape)
        return InstanceModel(self.step(shape, cross_node), self._blocks[shape])

    def transfer(self, src: Shape, dst: Shape, local: bool) -> tuple[float, float]:
        p = self.problem
        return kv_transfer_cost(p.model, p.hardware, p.dtype, src.devices, dst.devices, local)

    # saturation estimates: SLO-independent starting rates and lifetimes -----------------------
    def _prefill_batch(self, shape: Shape, cross_node: bool) -> tuple[int, float, float]:
        """(sequences, latency, busy) of a prefill batch filling the token budget."""
        budget = max(self.problem.policy.prefill_token_budget, int(self.mean_in))
        seqs = max(1, min(self.problem.policy.prefill_max_batch, int(budget / self.mean_in)))
        latency, busy = self.step(shape, cross_node).prefill(seqs, int(seqs * self.mean_in),
                                                             seqs * self.mean_in**2)
        return seqs, latency, busy

    def _decode_batch(self, shape: Shape, cross_node: bool) -> tuple[int, float]:
        """(batch, step seconds) of a decode instance running as many sequences as fit."""
        ctx = self.mean_in + self.mean_out / 2
        blocks = self.instance(shape, cross_node).kv_blocks
        batch = max(1, min(self.problem.policy.decode_max_batch,
                           int(blocks * self.problem.policy.block_size / ctx)))
        return batch, self.step(shape, cross_node).decode(batch, int(batch * ctx))

    def decode_lifetime(self, shape: Shape, cross_node: bool) -> float:
        """Seconds a mean request spends decoding on a saturated instance (SLO-independent)."""
        return self._decode_batch(shape, cross_node)[1] * max(1.0, self.mean_out - 1)

    def _search(self, simulate: Callable[[float], SimResult], cap: float) -> Goodput:
        def counted(rate: float) -> SimResult:
            self.simulations += 1
            return simulate(rate)
        if not cap > 0:
            return Goodput(rate=0.0, result=None, probes=0)
        return find_goodput(counted, self.problem.slo.attainment, 0.5 * min(cap, 1e6), cap=cap)

    def idle_attainment(self, prefill: tuple[Shape, bool] | None, decode: tuple[Shape, bool] | None,
                        local_kv: bool = True) -> float:
        """Share of requests meeting the SLO when each runs alone: an upper bound on attainment
        at any load, computed without simulating (so hopeless shapes cost nothing)."""
        p = self.problem
        trace = self.trace(p.search.requests)
        ok = 0
        for length, out in zip(trace.inputs, trace.outputs):
            ttft = 0.0
            if prefill:
                ttft = self.router_delay + self.step(*prefill).prefill(1, length, length * length)[0]
            tpot = 0.0
            if decode and out > 1:
                fixed, per_token = self.transfer(prefill[0] if prefill else decode[0], decode[0], local_kv)
                tpot = ((fixed + per_token * length) / (out - 1)
                        + self.step(*decode).decode(1, length + out // 2))
            ok += ttft <= p.slo.ttft_s and tpot <= p.slo.tpot_s
        return ok / trace.count

    # one instance of a phase ("prefill", "decode" or "colocated") -----------------------------
    def _single(self, kind: str, shape: Shape, cross_node: bool, local_kv: bool
                ) -> Callable[[float], SimResult]:
        p = self.problem
        inst = self.instance(shape, cross_node)
        if kind == "prefill":
            life = self._prefill_batch(shape, cross_node)[1]
        else:
            life = self.decode_lifetime(shape, cross_node)
        transfer = [[self.transfer(shape, shape, local_kv)]]

        def run(rate: float) -> SimResult:
            trace, window = self.sized(rate, life)
            if kind == "colocated":
                return simulate_colocated([inst], p.policy, trace, rate, p.slo, window, self.router_delay)
            pre, dec = ([inst], []) if kind == "prefill" else ([], [inst])
            return simulate_disaggregated(pre, dec, transfer, p.policy, trace, rate, p.slo, window,
                                          router_delay=self.router_delay)
        return run

    def capacity(self, kind: str, shape: Shape, cross_node: bool, local_kv: bool = True) -> float:
        """Saturation throughput of one instance: every request queued at once, completions/s
        in the middle of the run. Above it queues grow without bound (SLO-independent)."""
        key = ("cap", kind, shape, cross_node, local_kv)
        if key not in self._cache:
            self.simulations += 1
            try:
                rate = self._single(kind, shape, cross_node, local_kv)(SATURATED).throughput
            except SimulationError:
                rate = 0.0
            self._cache[key] = rate
        return self._cache[key]  # type: ignore[return-value]

    def phase_goodput(self, kind: str, shape: Shape, cross_node: bool, local_kv: bool = True) -> Goodput:
        """Goodput of one isolated instance: prefill judged on TTFT, decode on TPOT, colocated
        on both; zero without simulating when requests miss the SLO even running alone."""
        key = ("goodput", kind, shape, cross_node, local_kv)
        if key not in self._cache:
            pre = (shape, cross_node) if kind != "decode" else None
            dec = (shape, cross_node) if kind != "prefill" else None
            if self.idle_attainment(pre, dec, local_kv) < self.problem.slo.attainment:
                self._cache[key] = Goodput(rate=0.0, result=None, probes=0)
            else:
                cap = self.capacity(kind, shape, cross_node, local_kv)
                self._cache[key] = self._search(self._single(kind, shape, cross_node, local_kv), cap)
        return self._cache[key]  # type: ignore[return-value]

    # whole deployments ---------------------------------------------------------------------
    def _joint(self, dep: Deployment) -> Callable[[float], SimResult]:
        layers, p = self.problem.model.layers, self.problem
        pre = [self.instance(dep.prefill, len(i.nodes) > 1) for i in dep.prefill_at]
        dec = [self.instance(dep.decode, len(i.nodes) > 1) for i in dep.decode_at]
        local = [[kv_is_local(src, dst, layers) for dst in dep.decode_at] for src in dep.prefill_at]
        transfer = [[self.transfer(dep.prefill, dep.decode, ok) for ok in row] for row in local]
        # Low node-affinity plans only work if the router keeps each request's KV on its node.
        affinity = [[j for j, ok in enumerate(row) if ok] for row in local] \
            if dep.algorithm == "low-affinity" else None
        lifetime = (self._prefill_batch(dep.prefill, False)[1]
                    + self.decode_lifetime(dep.decode, False))
        interference = p.calibration.interference if p.calibration else None
        shared_node = [[j for j, dst in enumerate(dep.decode_at) if set(src.nodes) & set(dst.nodes)]
                       for src in dep.prefill_at]

        def run(rate: float) -> SimResult:
            trace, window = self.sized(rate, lifetime)
            return simulate_disaggregated(pre, dec, transfer, p.policy, trace, rate, p.slo, window,
                                          affinity, interference, shared_node, self.router_delay)
        return run

    def joint_capacity(self, dep: Deployment) -> float:
        """Sum of the instances' saturation throughputs, the weaker phase bounding."""
        return min(sum(self.capacity("prefill", dep.prefill, len(i.nodes) > 1) for i in dep.prefill_at),
                   sum(self.capacity("decode", dep.decode, len(i.nodes) > 1) for i in dep.decode_at))

    def simulate(self, dep: Deployment, rate: float) -> SimResult:
        self.simulations += 1
        return self._joint(dep)(rate)

    def joint_goodput(self, dep: Deployment) -> Goodput:
        key = ("joint", dep)
        if key not in self._cache:
            self._cache[key] = self._search(self._joint(dep), self.joint_capacity(dep))
        return self._cache[key]  # type: ignore[return-value]

    # colocated baseline --------------------------------------------------------------------
    def _colocated(self, shape: Shape, replicas: int) -> Callable[[float], SimResult]:
        p = self.problem
        insts: Sequence[InstanceModel] = [self.instance(shape, False)] * replicas
        lifetime = self.decode_lifetime(shape, False)

        def run(rate: float) -> SimResult:
            trace, window = self.sized(rate, lifetime)
            return simulate_colocated(insts, p.policy, trace, rate, p.slo, window, self.router_delay)
        return run

    def colocated_goodput(self, shape: Shape, replicas: int) -> Goodput:
        """Goodput of ``replicas`` colocated instances behind the router."""
        if replicas == 1:
            return self.phase_goodput("colocated", shape, False)
        key = ("colocated", shape, replicas)
        if key not in self._cache:
            if self.phase_goodput("colocated", shape, False).rate <= 0:
                self._cache[key] = Goodput(rate=0.0, result=None, probes=0)
            else:
                cap = replicas * self.capacity("colocated", shape, False)
                self._cache[key] = self._search(self._colocated(shape, replicas), cap)
        return self._cache[key]  # type: ignore[return-value]

    def simulate_colocated(self, shape: Shape, replicas: int, rate: float) -> SimResult:
        self.simulations += 1
        return self._colocated(shape, replicas)(rate)
