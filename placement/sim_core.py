"""Pieces shared by the disaggregated and colocated simulators: SLOs, results, the decode batch."""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Annotated, Sequence

import msgspec

from .latency import StepModel


class SimulationError(RuntimeError):
    """The simulated deployment cannot serve the workload at all (e.g. a request never fits)."""


class Slo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Latency targets; a request attains when it meets both TTFT and TPOT."""

    ttft_ms: Annotated[float, msgspec.Meta(gt=0)]
    tpot_ms: Annotated[float, msgspec.Meta(gt=0)]
    attainment: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.9

    @property
    def ttft_s(self) -> float:
        return self.ttft_ms / 1000.0

    @property
    def tpot_s(self) -> float:
        return self.tpot_ms / 1000.0


class Interference(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How much slower one phase's steps run while an instance of the other phase on the same node
    is busy (0.1 = 10% slower): on CPU the instances share the node's memory bandwidth. Measured
    by `tandem profile --served` (cluster/served_profile.py); expected near 0 for instances that
    share no device or memory bus (not measured here)."""

    prefill: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    decode: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class Percentiles(msgspec.Struct, frozen=True):
    """Latency percentiles in seconds."""

    mean: float
    p50: float
    p90: float
    p99: float


def percentiles(values: Sequence[float]) -> Percentiles:
    data = sorted(values)
    if not data:
        return Percentiles(0.0, 0.0, 0.0, 0.0)

    def at(q: float) -> float:  # linear interpolation between closest ranks
        pos = q * (len(data) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(data) - 1)
        return data[lo] + (data[hi] - data[lo]) * (pos - lo)

    return Percentiles(mean=sum(data) / len(data), p50=at(0.5), p90=at(0.9), p99=at(0.99))


class SimResult(msgspec.Struct, frozen=True):
    """Per-request latencies of the measured requests (after warm-up) and their summary."""

    rate: float
    ttft: tuple[float, ...]
    tpot: tuple[float, ...]
    attainment: float  # share meeting both SLOs
    ttft_attainment: float
    tpot_attainment: float
    ttft_pct: Percentiles
    tpot_pct: Percentiles
    throughput: float  # completions/s between the 25th and 75th percentile finish times
    preemptions: int = 0


def summarize(rate: float, arrival: Sequence[float], first: Sequence[float],
              finish: Sequence[float], outputs: Sequence[int], slo: Slo,
              window: tuple[int, int] | None = None, preemptions: int = 0,
              router_delay: float = 0.0) -> SimResult:
    """Latencies of requests ``window[0] <= index < window[1]`` (all when None).

    ``router_delay``: seconds a served request spends outside the model steps on its way to the
    first token (dispatch to an instance, the first token's report). Every request pays it and
    every later token is shifted by it too, so it adds to TTFT and leaves TPOT and the queues as
    they are."""
    lo, hi = window if window is not None else (0, len(arrival))
    ttft, tpot = [], []
    both = ok_ttft = ok_tpot = 0
    for i in range(max(0, lo), min(hi, len(arrival))):
        t = first[i] - arrival[i] + router_delay
        p = (finish[i] - first[i]) / (outputs[i] - 1) if outputs[i] > 1 else 0.0
        ttft.append(t)
        tpot.append(p)
        a, b = t <= slo.ttft_s, p <= slo.tpot_s
        ok_ttft += a
        ok_tpot += b
        both += a and b
    n = max(1, len(ttft))
    return SimResult(rate=rate, ttft=tuple(ttft), tpot=tuple(tpot), attainment=both / n,
                     ttft_attainment=ok_ttft / n, tpot_attainment=ok_tpot / n,
                     ttft_pct=percentiles(ttft), tpot_pct=percentiles(tpot),
                     throughput=_throughput(finish), preemptions=preemptions)


def _throughput(finish: Sequence[float]) -> float:
    """Completion rate in the middle half of the run: with every request queued at once it is
    the deployment's saturation throughput, unaffected by the ramp-up and the drain."""
    done = sorted(finish)
    a, b = len(done) // 4, (3 * len(done)) // 4
    span = done[b] - done[a] if done else 0.0
    return (b - a) / span if span > 0 else math.inf


@dataclass(frozen=True)
class InstanceModel:
    """What a simulated instance needs: its step times and its KV capacity in blocks."""

    step: StepModel
    kv_blocks: int


class DecodeBatch:
    """Running sequences of one instance, advanced one token per step.

    A step costs O(1) plus O(sequences that join, finish or are preempted): finishing steps sit in a
    heap, and block growth is counted per step phase (a sequence needs a new block every
    ``block_size`` steps, at a phase fixed when it joins). Blocks for a sequence's current context
    plus one token are reserved by the caller before ``join``.
    """

    def __init__(self, total_blocks: int, block_size: int) -> None:
        self.total_blocks = total_blocks
        self.free_blocks = total_blocks
        self.block_size = block_size
        self.step = 0
        self.size = 0
        self.sum_ctx = 0
        self._phase_count = [0] * block_size
        self._finish: list[tuple[int, int, int]] = []  # (finish step, rid, epoch)
        self._order: list[tuple[int, int]] = []  # (rid, epoch) in join order, for LIFO preemption
        self._live: dict[int, tuple[int, int, int, int]] = {}  # rid -> (join, ctx0, remaining, epoch)
        self._epoch = 0

    def join(self, rid: int, ctx: int, remaining: int) -> None:
        self._epoch += 1
        self._live[rid] = (self.step, ctx, remaining, self._epoch)
        self.size += 1
        self.sum_ctx += ctx
        self._phase_count[(self.step - ctx) % self.block_size] += 1
        heapq.heappush(self._finish, (self.step + remaining, rid, self._epoch))
        self._order.append((rid, self._epoch))

    def _remove(self, rid: int) -> tuple[int, int]:
        """Drop a live sequence; returns (current context, tokens still to produce)."""
        join, ctx0, remaining, _ = self._live.pop(rid)
        done = self.step - join
        ctx = ctx0 + done
        self.size -= 1
        self.sum_ctx -= ctx
        self.free_blocks += math.ceil(ctx / self.block_size)
        self._phase_count[(join - ctx0) % self.block_size] -= 1
        return ctx, remaining - done

    def grow(self) -> list[tuple[int, int, int]]:
        """Allocate this step's new blocks, preempting the newest sequences if memory runs out.

        Returns the preempted (rid, context, remaining) so the caller can requeue them.
        """
        preempted = []
        phase = self.step % self.block_size
        while self._phase_count[phase] > self.free_blocks:
            rid, epoch = self._order.pop()
            state = self._live.get(rid)
            if state is None or state[3] != epoch:
                continue  # finished or already preempted
            ctx, remaining = self._remove(rid)
            preempted.append((rid, ctx, remaining))
        self.free_blocks -= self._phase_count[phase]
        return preempted

    def advance(self) -> list[int]:
        """Account for a finished step; returns the sequences that produced their last token."""
        self.sum_ctx += self.size
        self.step += 1
        finished = []
        heap = self._finish
        while heap and heap[0][0] <= self.step:
            _, rid, epoch = heapq.heappop(heap)
            state = self._live.get(rid)
            if state is not None and state[3] == epoch:
                self._remove(rid)
                finished.append(rid)
        return finished
