"""Discrete-event simulator of colocated instances: the baseline disaggregation must beat.

Each instance runs vLLM-style continuous batching where one step carries every running decode
sequence plus whole waiting prompts (FCFS, under the prefill token budget and the KV blocks left),
so a long prefill stalls all decodes sharing the step: the interference disaggregation removes.
With ``policy.chunked_prefill`` a step holds at most ``prefill_token_budget`` tokens: the decodes
first, then chunks of the prompts already started and of waiting ones (FCFS); a chunk of n tokens
after p cached ones counts n * (2p + n) toward the step's attention term (p = 0: a whole prompt's
n^2). A prompt's first token comes at the end of the step that holds its last chunk.
A sequence preempted for memory is recomputed: it re-enters the prompt queue at the front with its
prompt plus the tokens produced so far. The router sends each request to the instance with the
fewest queued prompt tokens (ties: most free blocks).
"""
from __future__ import annotations

import heapq
from collections import deque
from typing import Sequence

from .memory import blocks_for
from .policy import Policy
from .sim_core import DecodeBatch, InstanceModel, SimResult, SimulationError, Slo, summarize
from .workload import BaseTrace


class _Instance:
    __slots__ = ("idx", "model", "batch", "waiting", "queued_tokens", "ready", "busy", "running",
                 "watermark", "partial", "chunks")

    def __init__(self, idx: int, model: InstanceModel, policy: Policy) -> None:
        self.idx = idx
        self.model = model
        self.batch = DecodeBatch(model.kv_blocks, policy.block_size)
        self.waiting: deque[tuple[int, int, int]] = deque()  # (rid, prompt tokens, remaining)
        self.queued_tokens = 0
        self.ready: list[tuple[int, int, int]] = []  # prefilled, joins the next step
        self.running: list[tuple[int, int, int]] = []  # prompts in the current step
        self.partial: list[list[int]] = []  # chunked: [rid, prompt, remaining, cached] started prompts
        self.chunks: list[tuple[list[int], int]] = []  # chunked: (partial entry, tokens) this step
        self.busy = False
        self.watermark = int(policy.watermark * model.kv_blocks)


class ColocatedSim:
    """One simulation run of colocated instances; construct, then ``run()`` once."""

    def __init__(self, instances: Sequence[InstanceModel], policy: Policy, trace: BaseTrace,
                 rate: float, router_delay: float = 0.0) -> None:
        self.policy = policy
        self.router_delay = router_delay
        self.instances = [_Instance(i, m, policy) for i, m in enumerate(instances)]
        self.rate = rate
        self.arrival = trace.arrivals(rate)
        self.inputs, self.outputs = trace.inputs, trace.outputs
        self.first = [-1.0] * trace.count
        self.finish = [-1.0] * trace.count
        self.events: list[tuple[float, int, int]] = []  # (time, seq, instance)
        self.seq = 0
        self.preemptions = 0

    def run(self, slo: Slo, window: tuple[int, int] | None = None) -> SimResult:
        events, arrival = self.events, self.arrival
        i, n = 0, len(arrival)
        while i < n or events:
            if events and (i >= n or events[0][0] <= arrival[i]):
                time, _, idx = heapq.heappop(events)
                self._step_end(time, self.instances[idx])
            else:
                self._arrive(arrival[i], i)
                i += 1
        if any(f < 0 for f in self.finish):
            raise SimulationError("some requests never finished: an instance has too little KV memory")
        return summarize(self.rate, arrival, self.first, self.finish, self.outputs, slo, window,
                         self.preemptions, self.router_delay)

    def _arrive(self, now: float, rid: int) -> None:
        inst = min(self.instances, key=lambda x: (x.queued_tokens, -x.batch.free_blocks))
        inst.waiting.append((rid, self.inputs[rid], self.outputs[rid]))
        inst.queued_tokens += self.inputs[rid]
        if not inst.busy:
            self._step_start(now, inst)

    def _take_prompts(self, inst: _Instance) -> tuple[int, int]:
        """Move FCFS prompts that fit the token budget, batch cap and free blocks into the step."""
        tokens = sum_sq = 0
        batch = inst.batch
        room = self.policy.decode_max_batch - batch.size - len(inst.ready)
        while inst.waiting and len(inst.running) < room:
            rid, length, remaining = inst.waiting[0]
            if inst.running and tokens + length > self.policy.prefill_token_budget:
                break
            if not self._reserve(inst, length):
                break
            inst.queued_tokens -= length
            inst.running.append((rid, length, remaining))
            tokens += length
            sum_sq += length * length
        return tokens, sum_sq

    def _reserve(self, inst: _Instance, length: int) -> bool:
        """Take the first waiting prompt off the queue with blocks for its context and first
        token, if they are free above the watermark."""
        need = blocks_for(length + 1, self.policy.block_size)
        if need + inst.watermark > inst.batch.free_blocks:
            if need + inst.watermark > inst.batch.total_blocks:
                raise SimulationError(f"a {length}-token context exceeds an instance's KV")
            return False
        inst.waiting.popleft()
        inst.batch.free_blocks -= need
        return True

    def _step_start(self, now: float, inst: _Instance) -> None:
        batch = inst.batch
        for rid, ctx, remaining in batch.grow():
            self.preemptions += 1
            inst.waiting.appendleft((rid, ctx, remaining))  # recompute prompt + produced tokens
            inst.queued_tokens += ctx
        for rid, ctx, remaining in inst.ready:
            batch.join(rid, ctx, remaining)
        inst.ready = []
        if self.policy.chunked_prefill:
            seqs, tokens, sum_sq = self._take_chunks(inst)
        else:
            tokens, sum_sq = self._take_prompts(inst)
            seqs = len(inst.running)
        if batch.size == 0 and not seqs:
            inst.busy = False
            return
        inst.busy = True
        seconds = inst.model.step.mixed(seqs, tokens, sum_sq, batch.size, batch.sum_ctx)
        self.seq += 1
        heapq.heappush(self.events, (now + seconds, self.seq, inst.idx))

    def _take_chunks(self, inst: _Instance) -> tuple[int, int, int]:
        """Chunked prefill: after the decodes, chunks of started prompts, then of waiting ones
        that fit the batch cap and the free blocks (all of a prompt's blocks reserved when it
        starts), within the step's token budget; (chunks, tokens, attention term)."""
        budget = self.policy.prefill_token_budget - inst.batch.size
        cap = self.policy.long_prefill_tokens or self.policy.prefill_token_budget
        tokens = attention = 0
        for entry in inst.partial:
            if budget <= 0:
                break
            n = min(entry[1] - entry[3], budget, cap)
            inst.chunks.append((entry, n))
            tokens, attention, budget = tokens + n, attention + n * (2 * entry[3] + n), budget - n
        batch = inst.batch
        room = self.policy.decode_max_batch - batch.size - len(inst.partial)
        while inst.waiting and budget > 0 and room > 0:
            rid, length, remaining = inst.waiting[0]
            if not self._reserve(inst, length):
                break
            entry = [rid, length, remaining, 0]
            inst.partial.append(entry)
            n = min(length, budget, cap)
            inst.chunks.append((entry, n))
            tokens, attention, budget, room = tokens + n, attention + n * n, budget - n, room - 1
        return len(inst.chunks), tokens, attention

    def _end_chunks(self, inst: _Instance) -> None:
        """Each chunk's tokens are cached; a prompt whose last chunk ran becomes a finished prefill."""
        for entry, n in inst.chunks:
            entry[3] += n
            inst.queued_tokens -= n  # the router sees the prompt tokens not yet cached
            if entry[3] == entry[1]:
                inst.partial.remove(entry)
                inst.running.append((entry[0], entry[1], entry[2]))
        inst.chunks = []

    def _step_end(self, now: float, inst: _Instance) -> None:
        for rid in inst.batch.advance():
            self.finish[rid] = now
        if self.policy.chunked_prefill:
            self._end_chunks(inst)
        bs = self.policy.block_size
        for rid, ctx, remaining in inst.running:
            if self.first[rid] < 0:
                self.first[rid] = now
            remaining -= 1  # a prefill (or a recompute) samples one token
            if remaining <= 0:
                self.finish[rid] = now
                inst.batch.free_blocks += blocks_for(ctx + 1, bs)
            else:
                inst.ready.append((rid, ctx, remaining))
        inst.running = []
        self._step_start(now, inst)


def simulate_colocated(instances: Sequence[InstanceModel], policy: Policy, trace: BaseTrace,
                       rate: float, slo: Slo, window: tuple[int, int] | None = None,
                       router_delay: float = 0.0) -> SimResult:
    """Simulate ``trace`` at ``rate`` req/s over colocated instances, measuring ``window``;
    ``router_delay`` is added to every TTFT (sim_core.summarize)."""
    if not instances:
        raise ValueError("need at least one instance")
    return ColocatedSim(instances, policy, trace, rate, router_delay).run(slo, window)
