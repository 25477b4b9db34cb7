"""Continuous-batching scheduler. Its decisions are plain data (``StepPlan``), testable without a model.

A step is either a prefill (whole prompts, FCFS, under a token budget and a batch-size cap) or a
decode (one token for every running request). Prefill goes first so new requests join the batch
quickly. When a running request cannot get a slot for its next token, the most recently arrived
running request is preempted: its blocks are freed and it is recomputed later by a prefill over
prompt + output so far (its RNG state is kept, so seeded outputs do not change).

With ``chunked_prefill`` (Sarathi-Serve's stall-free batching) every step is one token budget,
``max_num_batched_tokens``: the running decodes go first, one token each; prompts already being
prefilled continue, then waiting prompts start, each taking a chunk of what budget is left, so a
long prompt is split over several steps and never stalls the running requests for its whole
prefill. ``long_prefill_tokens`` caps one prompt's chunk, so the prompts queued behind a long one
share its steps instead of waiting for its last chunk. A prompt is ``PREFILLING`` between its
chunks, holds the blocks of what it has cached, and is preempted like any running request (the
newest first).

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
    max_num_batched_tokens: int = 8192  # a prefill step's tokens; with chunked_prefill, every step's
    enable_prefill: bool = True
    enable_decode: bool = True
    chunked_prefill: bool = False
    long_prefill_tokens: int | None = None  # chunked: one prompt's tokens per step at most

    def __post_init__(self) -> None:
        if self.chunked_prefill and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"chunked prefill needs max_num_batched_tokens >= max_num_seqs (got "
                f"{self.max_num_batched_tokens} < {self.max_num_seqs}): every running request "
                "decodes in every step, inside the step's token budget")
        if self.long_prefill_tokens is not None and self.long_prefill_tokens < 1:
            raise ValueError(f"long_prefill_tokens must be >= 1, got {self.long_prefill_tokens}")


@dataclass(frozen=True)
class StepPlan:
    """What the next model step runs; ``preempted`` lists requests evicted to make room.

    ``mixed`` (chunked prefill): ``chunks[i]`` is (first token, tokens) of ``seqs[i]`` this step,
    decodes first; a request samples only when its chunk reaches its newest token."""

    kind: Literal["prefill", "decode", "mixed"]
    seqs: tuple[Sequence, ...]
    preempted: tuple[Sequence, ...] = ()
    chunks: tuple[tuple[int, int], ...] = ()

    @property
    def num_tokens(self) -> int:
        if self.kind == "mixed":
            return sum(n for _, n in self.chunks)
        return sum(s.num_tokens for s in self.seqs) if self.kind == "prefill" else len(self.seqs)

    def sampling_rows(self) -> list[int]:
        """Rows of ``seqs`` that sample a token this step (all but mid-prompt chunks)."""
        if self.kind != "mixed":
            return list(range(len(self.seqs)))
        return [i for i, (seq, (start, n)) in enumerate(zip(self.seqs, self.chunks))
                if start + n == seq.num_tokens]


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def add_first(self, seq: Sequence) -> None:
        """Queue a request ahead of the waiting ones (it was running elsewhere)."""
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admit a request whose KV (all but its newest token) already sits in its blocks."""
        if seq.request_id not in self.blocks.tables:
            raise ValueError(f"request {seq.request_id!r} has no blocks; allocate them first")
        seq.status = Status.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan | None:
        if self.config.chunked_prefill:
            return self._schedule_chunked()
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

    def _schedule_decode(self) -> StepPlan | None:
        return self.schedule_decode_part(set(), self.config.max_num_seqs)

    def schedule_decode_part(self, busy: set[str], limit: int) -> StepPlan | None:
        """A decode step of at most ``limit`` running requests, oldest first, none of them in
        ``busy`` (in a step still in flight: pipelined decoding). A request that finds no room for
        its next token preempts the newest one outside ``busy`` (itself if none is left). None if
        there is nothing to run."""
        free = [seq for seq in self.running if seq.request_id not in busy]
        scheduled: list[Sequence] = []
        preempted: list[Sequence] = []
        while free and len(scheduled) < limit:
            seq = free.pop(0)
            while not self.blocks.can_append(seq.request_id, seq.num_tokens):
                victim = free.pop() if free else seq
                self.running.remove(victim)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append_slot(seq.request_id, seq.num_tokens)
                scheduled.append(seq)
        if not scheduled and not preempted:
            return None
        return StepPlan("decode", tuple(scheduled), tuple(preempted))

    # -- chunked prefill: one token budget per step, decodes first ------------------------------

    def _schedule_chunked(self) -> StepPlan | None:
        budget = self.config.max_num_batched_tokens
        chunks: list[tuple[Sequence, int, int]] = []
        preempted: list[Sequence] = []
        if self.config.enable_decode:
            budget = self._continue_decodes(budget, chunks, preempted)
        if self.config.enable_prefill:
            budget, stalled = self._continue_prefills(budget, chunks)
            if not preempted:  # never restart a request in the step that preempted it
                self._start_waiting(budget, chunks)
            if stalled and not chunks and len(self.running) > 1:
                # Prompts half-prefilled and no room for any of them: free the newest one's blocks
                # so the others can go on (alone, a prompt waits for blocks held elsewhere).
                victim = self.running[-1]
                self._preempt_running(victim)
                preempted.append(victim)
        if not chunks:
            return StepPlan("decode", (), tuple(preempted)) if preempted else None
        return self._chunked_plan(chunks, tuple(preempted))

    def _continue_decodes(self, budget: int, chunks: list, preempted: list) -> int:
        """One token for each running request while the budget and the batch cap last, preempting
        the newest running requests (half-prefilled ones too) when blocks run out."""
        for seq in [s for s in self.running if s.status is Status.RUNNING]:
            if budget <= 0 or len(chunks) >= self.config.max_num_seqs:
                break
            if seq.status is not Status.RUNNING:  # preempted for an earlier request in this loop
                continue
            if self._grow_or_preempt(seq, seq.num_tokens, preempted):
                chunks.append((seq, seq.num_tokens - 1, 1))
                budget -= 1
        return budget

    def _continue_prefills(self, budget: int, chunks: list) -> tuple[int, bool]:
        """The next chunk of each half-prefilled prompt, as large as the budget and the free blocks
        allow; (budget left, whether some prompt got no room at all)."""
        stalled = False
        for seq in [s for s in self.running if s.status is Status.PREFILLING]:
            if budget <= 0 or len(chunks) >= self.config.max_num_seqs:
                break
            start = seq.num_cached
            table = self.blocks.tables[seq.request_id]
            room = (len(table) + self.blocks.num_free) * self.blocks.block_size - start
            count = min(seq.num_tokens - start, budget, room, self._chunk_cap)
            if count <= 0:
                stalled = True
                continue
            self.blocks.append_slot(seq.request_id, start + count)
            chunks.append((seq, start, count))
            budget -= count
        return budget, stalled

    @property
    def _chunk_cap(self) -> int:
        return self.config.long_prefill_tokens or self.config.max_num_batched_tokens

    def _grow_or_preempt(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Blocks for ``seq`` to hold ``num_tokens``, preempting the newest running requests until
        they fit; False if ``seq`` itself had to go."""
        while not self.blocks.can_append(seq.request_id, num_tokens):
            victim = self.running[-1]
            self._preempt_running(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        self.blocks.append_slot(seq.request_id, num_tokens)
        return True

    def _preempt_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._preempt(seq)

    def _start_waiting(self, budget: int, chunks: list) -> None:
        """Waiting prompts, first come first served, each a chunk of what budget is left."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            count = min(seq.num_tokens, budget, self._chunk_cap)
            if not self.blocks.can_allocate(count):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq.request_id, count)
            seq.status, seq.num_cached = Status.PREFILLING, 0
            self.running.append(seq)
            chunks.append((seq, 0, count))
            budget -= count

    def _chunked_plan(self, chunks: list, preempted: tuple[Sequence, ...]) -> StepPlan:
        """The step's plan, each request's progress recorded: a prompt whose chunk reaches its
        newest token is RUNNING after this step (it samples its next token)."""
        chunks = [c for c in chunks if c[0] not in preempted]
        for seq, start, count in chunks:
            if seq.status is Status.PREFILLING:
                seq.num_cached = start + count
                if seq.num_cached == seq.num_tokens:
                    seq.status = Status.RUNNING
        if all(s.status is Status.RUNNING and start == s.num_tokens - 1 and n == 1
               for s, start, n in chunks):
            return StepPlan("decode", tuple(s for s, _, _ in chunks), preempted)
        return StepPlan("mixed", tuple(s for s, _, _ in chunks), preempted,
                        tuple((start, n) for _, start, n in chunks))

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.request_id)
        seq.status = Status.WAITING
        seq.num_cached = 0
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

    def tokens_to_prefill(self) -> int:
        """Prompt tokens (recomputed ones included) still waiting for their KV."""
        return (sum(s.num_tokens for s in self.waiting)
                + sum(s.num_tokens - s.num_cached for s in self.running if s.status is Status.PREFILLING))

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
