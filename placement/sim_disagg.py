"""Discrete-event simulator of N prefill + M decode instances behind tandem's router.

Mirrors the real policies (DESIGN.md, request lifecycle):
- router -> prefill: the instance with the fewest outstanding prompt tokens;
- prefill: FCFS batches of whole prompts under a token budget, only when the instance has KV blocks
  for them; pipelined instances accept a new batch once their slowest stage is free; blocks stay
  held until the decode side has pulled the KV, so decode memory pressure backs up into prefill;
- router -> decode: the instance with the most free KV blocks net of queued admissions, among the
  prefill instance's ``affinity`` set when one is given (Algorithm 2 plans keep KV inside a node);
- decode: FCFS admission that waits for blocks (plus a watermark), then the KV transfer, then the
  request joins the next continuous-batching step; out of blocks mid-decode, the newest sequence is
  preempted and re-admitted later (its KV fetched again, costing another transfer);
- interference: instances of the two phases on one node slow each other down (shared memory
  bandwidth on CPU). A prefill batch that starts while a decode instance on its node is busy takes
  ``1 + interference.prefill`` times as long; a decode step that starts while a prefill instance on
  its node is mid-batch takes ``1 + interference.decode`` times as long.

With no prefill instances, requests arrive straight at decode (TTFT 0): the isolated decode phase.
With no decode instances, requests end at their first token: the isolated prefill phase.
"""
from __future__ import annotations

import heapq
from collections import deque
from typing import Sequence

from .memory import blocks_for
from .policy import Policy
from .sim_core import DecodeBatch, InstanceModel, Interference, SimResult, SimulationError, Slo, summarize
from .workload import BaseTrace

_PREFILL_TRY, _PREFILL_DONE, _TRANSFER_DONE, _STEP_END = range(4)


class _Prefill:
    __slots__ = ("idx", "model", "free", "total", "queue", "outstanding", "next_start", "pending",
                 "busy_until", "neighbours")

    def __init__(self, idx: int, model: InstanceModel) -> None:
        self.idx = idx
        self.model = model
        self.free = self.total = model.kv_blocks
        self.queue: deque[int] = deque()
        self.outstanding = 0  # prompt tokens queued or running
        self.next_start = 0.0
        self.pending = False  # a _PREFILL_TRY event is scheduled
        self.busy_until = 0.0  # end of the batch in flight
        self.neighbours: list[_Decode] = []  # decode instances on this instance's node


class _Decode:
    __slots__ = ("idx", "model", "batch", "waiting", "demand", "ready", "busy", "watermark",
                 "neighbours")

    def __init__(self, idx: int, model: InstanceModel, policy: Policy) -> None:
        self.idx = idx
        self.model = model
        self.batch = DecodeBatch(model.kv_blocks, policy.block_size)
        self.waiting: deque[tuple[int, int, int]] = deque()  # (rid, ctx, remaining)
        self.demand = 0  # blocks the waiting admissions will need
        self.ready: list[tuple[int, int, int]] = []  # KV arrived, joins at the next step
        self.busy = False
        self.watermark = int(policy.watermark * model.kv_blocks)
        self.neighbours: list[_Prefill] = []  # prefill instances on this instance's node


class DisaggSim:
    """One simulation run; construct, then call ``run()`` once."""

    def __init__(self, prefill: Sequence[InstanceModel], decode: Sequence[InstanceModel],
                 transfer: Sequence[Sequence[tuple[float, float]]], policy: Policy,
                 trace: BaseTrace, rate: float,
                 affinity: Sequence[Sequence[int]] | None = None,
                 interference: Interference | None = None,
                 shared_node: Sequence[Sequence[int]] | None = None, router_delay: float = 0.0) -> None:
        self.policy = policy
        self.router_delay = router_delay
        self.bs = policy.block_size
        self.prefills = [_Prefill(i, m) for i, m in enumerate(prefill)]
        self.decodes = [_Decode(i, m, policy) for i, m in enumerate(decode)]
        self.transfer = transfer  # [prefill index or 0][decode index] -> (fixed s, s per token)
        # Decode instances each prefill instance may hand requests to (default: all of them).
        every = list(self.decodes)
        self.targets = [[self.decodes[j] for j in group] for group in affinity] if affinity else \
            [every] * max(1, len(self.prefills))
        # shared_node[p]: the decode instances on prefill instance p's node (default: none).
        self.slowdown = interference or Interference()
        for p, group in zip(self.prefills, shared_node or ()):
            for j in group:
                p.neighbours.append(self.decodes[j])
                self.decodes[j].neighbours.append(p)
        self.arrival = trace.arrivals(rate)
        self.inputs, self.outputs = trace.inputs, trace.outputs
        n = trace.count
        self.first = [0.0] * n
        self.finish = [-1.0] * n
        self.source = [0] * n
        self.held = [0] * n  # prefill blocks held until the KV is pulled
        self.events: list[tuple[float, int, int, int, int]] = []
        # Event tuples carry ints only; batches and transfers live here keyed by a counter.
        self._stash: dict[int, list[int]] = {}
        self.rate = rate
        self.seq = 0
        self.preemptions = 0

    def _push(self, time: float, kind: int, a: int, b: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (time, self.seq, kind, a, b))

    def run(self, slo: Slo, window: tuple[int, int] | None = None) -> SimResult:
        events, arrival = self.events, self.arrival
        i, n = 0, len(arrival)
        handlers = (self._prefill_try, self._prefill_done, self._transfer_done, self._step_end)
        while i < n or events:
            if events and (i >= n or events[0][0] <= arrival[i]):
                time, _, kind, a, b = heapq.heappop(events)
                handlers[kind](time, a, b)
            else:
                self._arrive(arrival[i], i)
                i += 1
        if any(f < 0 for f in self.finish):
            raise SimulationError("some requests never finished: an instance has too little KV memory")
        return summarize(self.rate, arrival, self.first, self.finish, self.outputs, slo, window,
                         self.preemptions, self.router_delay)

    # prefill side ---------------------------------------------------------------------------
    def _arrive(self, now: float, rid: int) -> None:
        if not self.prefills:  # isolated decode: the request shows up with its KV ready to pull
            self.first[rid] = now
            self._to_decode(now, rid)
            return
        inst = min(self.prefills, key=lambda p: p.outstanding)
        self.source[rid] = inst.idx
        inst.queue.append(rid)
        inst.outstanding += self.inputs[rid]
        self._prefill_start(now, inst)

    def _prefill_try(self, now: float, idx: int, _: int) -> None:
        inst = self.prefills[idx]
        inst.pending = False
        self._prefill_start(now, inst)

    def _prefill_start(self, now: float, inst: _Prefill) -> None:
        if inst.pending or not inst.queue:
            return
        if now < inst.next_start:
            inst.pending = True
            self._push(inst.next_start, _PREFILL_TRY, inst.idx)
            return
        batch, tokens, sum_sq, blocks = self._form_batch(inst)
        if not batch:
            return  # waiting for KV blocks; a transfer completion retries
        inst.free -= blocks
        latency, busy = inst.model.step.prefill(len(batch), tokens, sum_sq)
        if any(d.busy for d in inst.neighbours):
            factor = 1.0 + self.slowdown.prefill
            latency, busy = latency * factor, busy * factor
        inst.next_start = now + busy
        inst.busy_until = now + latency
        self._push(now + latency, _PREFILL_DONE, inst.idx, self._keep(batch))
        if inst.queue:
            inst.pending = True
            self._push(inst.next_start, _PREFILL_TRY, inst.idx)

    def _form_batch(self, inst: _Prefill) -> tuple[list[int], int, int, int]:
        batch: list[int] = []
        tokens = sum_sq = blocks = 0
        budget, cap = self.policy.prefill_token_budget, self.policy.prefill_max_batch
        while inst.queue and len(batch) < cap:
            rid = inst.queue[0]
            length = self.inputs[rid]
            need = blocks_for(length, self.bs)
            if batch and tokens + length > budget:
                break
            if blocks + need > inst.free:
                if need > inst.total:
                    raise SimulationError(f"a {length}-token prompt exceeds a prefill instance's KV")
                break
            inst.queue.popleft()
            batch.append(rid)
            self.held[rid] = need
            tokens += length
            sum_sq += length * length
            blocks += need
        return batch, tokens, sum_sq, blocks

    def _keep(self, items: list[int]) -> int:
        self.seq += 1
        self._stash[self.seq] = items
        return self.seq

    def _prefill_done(self, now: float, idx: int, key: int) -> None:
        inst = self.prefills[idx]
        for rid in self._stash.pop(key):
            self.first[rid] = now
            inst.outstanding -= self.inputs[rid]
            if self.outputs[rid] <= 1 or not self.decodes:
                self.finish[rid] = now
                inst.free += self.held[rid]
                self.held[rid] = 0
            else:
                self._to_decode(now, rid)
        self._prefill_start(now, inst)

    # decode side ----------------------------------------------------------------------------
    def _to_decode(self, now: float, rid: int) -> None:
        if self.outputs[rid] <= 1:
            self.finish[rid] = now
            return
        inst = max(self.targets[self.source[rid]], key=lambda d: d.batch.free_blocks - d.demand)
        ctx = self.inputs[rid]
        inst.waiting.append((rid, ctx, self.outputs[rid] - 1))
        inst.demand += blocks_for(ctx + 1, self.bs)
        self._admit(now, inst)

    def _admit(self, now: float, inst: _Decode) -> None:
        d_idx = inst.idx
        while inst.waiting:
            rid, ctx, remaining = inst.waiting[0]
            need = blocks_for(ctx + 1, self.bs)
            if need + inst.watermark > inst.batch.free_blocks:
                if need + inst.watermark > inst.batch.total_blocks:
                    raise SimulationError(f"a {ctx}-token context exceeds a decode instance's KV")
                return
            inst.waiting.popleft()
            inst.demand -= need
            inst.batch.free_blocks -= need
            fixed, per_token = self.transfer[self.source[rid]][d_idx]
            self._push(now + fixed + per_token * ctx, _TRANSFER_DONE, d_idx,
                       self._keep([rid, ctx, remaining]))

    def _transfer_done(self, now: float, d_idx: int, key: int) -> None:
        rid, ctx, remaining = self._stash.pop(key)
        if self.held[rid] and self.prefills:  # the ack frees the prefill's copy
            src = self.prefills[self.source[rid]]
            src.free += self.held[rid]
            self.held[rid] = 0
            self._prefill_start(now, src)
        inst = self.decodes[d_idx]
        inst.ready.append((rid, ctx, remaining))
        if not inst.busy:
            self._step_start(now, inst, d_idx)

    def _step_start(self, now: float, inst: _Decode, d_idx: int) -> None:
        batch = inst.batch
        for rid, ctx, remaining in batch.grow():
            self.preemptions += 1
            inst.waiting.appendleft((rid, ctx, remaining))
            inst.demand += blocks_for(ctx + 1, self.bs)
        room = self.policy.decode_max_batch - batch.size
        if inst.ready and room > 0:
            joining, inst.ready = inst.ready[:room], inst.ready[room:]
            for rid, ctx, remaining in joining:
                batch.join(rid, ctx, remaining)
        if batch.size == 0:
            inst.busy = False
            self._admit(now, inst)
            return
        inst.busy = True
        seconds = inst.model.step.decode(batch.size, batch.sum_ctx)
        if any(p.busy_until > now for p in inst.neighbours):
            seconds *= 1.0 + self.slowdown.decode
        self._push(now + seconds, _STEP_END, d_idx)

    def _step_end(self, now: float, d_idx: int, _: int) -> None:
        inst = self.decodes[d_idx]
        for rid in inst.batch.advance():
            self.finish[rid] = now
        self._admit(now, inst)
        self._step_start(now, inst, d_idx)


def simulate_disaggregated(prefill: Sequence[InstanceModel], decode: Sequence[InstanceModel],
                           transfer: Sequence[Sequence[tuple[float, float]]], policy: Policy,
                           trace: BaseTrace, rate: float, slo: Slo,
                           window: tuple[int, int] | None = None,
                           affinity: Sequence[Sequence[int]] | None = None,
                           interference: Interference | None = None,
                           shared_node: Sequence[Sequence[int]] | None = None,
                           router_delay: float = 0.0) -> SimResult:
    """Simulate ``trace`` at ``rate`` req/s; ``transfer[p][d]`` is the KV cost from p to d.

    Only requests with index in ``window`` (default: all) are measured, so callers can leave out
    the warm-up and the drain, when the system is emptier than in steady state. ``affinity[p]``
    lists the decode instances prefill instance p may send to (default: all). ``shared_node[p]``
    lists the decode instances on prefill instance p's node, which ``interference`` slows down
    while both are busy (default: none share). ``router_delay`` is added to every TTFT
    (sim_core.summarize).
    """
    if not prefill and not decode:
        raise ValueError("need at least one prefill or decode instance")
    if affinity is not None and (len(affinity) != len(prefill) or not all(affinity)):
        raise ValueError("affinity needs a non-empty decode list per prefill instance")
    if shared_node is not None and (len(shared_node) != len(prefill)
                                    or any(not 0 <= j < len(decode) for g in shared_node for j in g)):
        raise ValueError("shared_node needs a list of decode indices per prefill instance")
    return DisaggSim(prefill, decode, transfer, policy, trace, rate, affinity, interference,
                     shared_node, router_delay).run(slo, window)
