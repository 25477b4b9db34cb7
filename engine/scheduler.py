"""Continuous-batching scheduler. Its decisions are plain data (``StepPlan``), testable without a model.

A step is either a prefill (whole prompts, FCFS, under a token budget and a batch-size cap) or a
decode (one token for every running request). Prefill goes first so new requests join the batch
quickly. When a running request cannot get a slot for its next token, the most recently arrived
running request is preempted: its blocks are freed and it is recomputed later by a prefill over
prompt + output so far (its RNG state is kept, so seeded outputs do not change).

Flags let the disaggregated instances reuse it: a prefill instance schedules prefills only and
detaches each request after its first token; a decode instance admits requests whose KV arrived
from elsewhere straight into ``running``.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

import msgspec

from tandem.engine.block_manager import BlockManager
from tandem.engine.sequence import Sequence, Status


class SchedulerConfig(msgspec.Struct, frozen=True):
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 8192
    enable_prefill: bool = True
    enable_decode: bool = True


@dataclass(frozen=True)
class StepPlan:
    """What the next model step runs; ``preempted`` lists requests evicted to make room."""

    kind: Literal["prefill", "decode"]
    seqs: tuple[Sequence, ...]
    preempted: tuple[Sequence, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs) if self.kind == "prefill" else len(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admit a request whose KV (all but its newest token) already sits in its blocks."""
        if seq.request_id not in self.blocks.tables:
            raise ValueError(f"request {seq.request_id!r} has no blocks; allocate them first")
        seq.status = Status.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan | None:
        if self.config.enable_prefill and self.waiting:
            plan = self._schedule_prefill()
            if plan is not None:
                return plan
        if self.config.enable_decode and self.running:
            return self._schedule_decode()
        return None

    def _schedule_prefill(self) -> StepPlan | None:
        batch: list[Sequence] = []
        tokens = 0
        while self.waiting and len(batch) + len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            over_budget = tokens + seq.num_tokens > self.config.max_num_batched_tokens
            if (batch and over_budget) or not self.blocks.can_allocate(seq.num_tokens):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq.request_id, seq.num_tokens)
            seq.status = Status.RUNNING
            batch.append(seq)
            tokens += seq.num_tokens
        if not batch:
            return None
        self.running.extend(batch)
        return StepPlan("prefill", tuple(batch))

    def _schedule_decode(self) -> StepPlan:
        scheduled: list[Sequence] = []
        preempted: list[Sequence] = []
        while self.running and len(scheduled) < self.config.max_num_seqs:
            seq = self.running.popleft()
            while not self.blocks.can_append(seq.request_id, seq.num_tokens):
                victim = self.running.pop() if self.running else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append_slot(seq.request_id, seq.num_tokens)
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        return StepPlan("decode", tuple(scheduled), tuple(preempted))

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.request_id)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished request and return its blocks."""
        self._remove(seq)
        self.blocks.free(seq.request_id)
        seq.status = Status.FINISHED

    def detach(self, seq: Sequence) -> None:
        """Stop scheduling a request but keep its blocks (a prefill instance hands them over)."""
        self._remove(seq)

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.waiting, *self.running):
            if seq.request_id == request_id:
                return seq
        return None

    def _remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
