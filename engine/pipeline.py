"""Pipelined decoding for an engine whose workers form pp > 1 pipeline stages.

A decode step is bound by reading the weights, so splitting one batch into micro-batches only
rereads them; instead the running requests are decoded as up to pp disjoint batches with a step
of each in flight at once (as vLLM's virtual engines do): while the last stage finishes one
batch's step, the first stage already runs the next batch's. A batch's next step is scheduled
when its previous one is collected, so each request still gets one token per step of its own
batch and its outputs are exactly those of unpipelined decoding. Prefill (and chunked) steps are
not pipelined: when the scheduler has waiting requests the steps in flight are collected first.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable

from tandem.engine.scheduler import Scheduler, StepPlan

Collected = Callable[[StepPlan, object], list]  # a step's plan and result -> its token deltas


class DecodePipeline:
    """Up to ``depth`` decode steps in flight on ``runner`` (a GroupRunner: submit / collect)."""

    def __init__(self, runner, scheduler: Scheduler, depth: int) -> None:
        self.runner, self.scheduler, self.depth = runner, scheduler, depth
        self.in_flight: deque[tuple[StepPlan, object]] = deque()
        self.busy: set[str] = set()  # requests of the steps in flight
        self.num_overlapped = 0  # steps submitted while another was in flight

    def applies(self) -> bool:
        """Whether the next step may be pipelined: decodes only, nothing waiting to prefill."""
        return bool(self.in_flight) or (not self.scheduler.waiting and bool(self.scheduler.running))

    def step(self, on_result: Collected) -> tuple[StepPlan | None, list, int]:
        """Fill the pipeline with decode steps, then collect the oldest: (its plan, its deltas,
        requests preempted while scheduling). Waiting requests stop the filling, so the pipeline
        drains and the engine's next step can prefill them."""
        preempted = self._fill()
        if not self.in_flight:
            return None, [], preempted
        return *self._collect_oldest(on_result), preempted

    def drain(self, on_result: Collected) -> list:
        """Collect every step in flight (before a request in one of them is handed over or
        aborted); their deltas, oldest first."""
        deltas: list = []
        while self.in_flight:
            deltas += self._collect_oldest(on_result)[1]
        return deltas

    def _collect_oldest(self, on_result: Collected) -> tuple[StepPlan, list]:
        plan, ticket = self.in_flight.popleft()
        self.busy.difference_update(s.request_id for s in plan.seqs)
        return plan, on_result(plan, self.runner.collect(ticket))

    def _fill(self) -> int:
        preempted = 0
        while len(self.in_flight) < self.depth and not self.scheduler.waiting:
            share = math.ceil(len(self.scheduler.running) / self.depth)  # each batch its share
            limit = max(1, min(share, self.scheduler.config.max_num_seqs))
            plan = self.scheduler.schedule_decode_part(self.busy, limit)
            if plan is None:
                break
            preempted += len(plan.preempted)
            if not plan.seqs:
                continue
            if self.in_flight:
                self.num_overlapped += 1
            self.in_flight.append((plan, self.runner.submit(plan)))
            self.busy.update(s.request_id for s in plan.seqs)
        return preempted
