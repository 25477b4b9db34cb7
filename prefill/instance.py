"""PrefillInstance: prefill-only scheduling over the engine; publishes each request's KV.

After a request's prompt is prefilled and its first token sampled, its blocks are *held* (exported
through the transport) until the decode side acks the pull, then freed. Held blocks count against
the cache, so a decode pool that cannot keep up backs pressure up into prefill admission instead of
into an OOM. A held export that is never acked is reclaimed after ``hold_timeout_s``.
"""
from __future__ import annotations

import time

import msgspec

from engine.engine import Engine
from engine.outputs import TokenDelta
from engine.params import SamplingParams
from transfer.base import Transport
from transfer.messages import KVHandle, RequestState
from transfer.state import state_of


class PrefillResult(msgspec.Struct, frozen=True):
    """A prefilled request: its first token and, unless it already finished, its state and KV."""

    delta: TokenDelta
    state: RequestState | None
    handle: KVHandle | None
    prefill_start: float
    prefill_end: float


class PrefillInstance:
    def __init__(self, engine: Engine, transport: Transport, hold_timeout_s: float = 60.0) -> None:
        if engine.scheduler.config.enable_decode:
            raise ValueError("a prefill instance needs an engine scheduled with enable_decode=False")
        self.engine = engine
        self.transport = transport
        self.hold_timeout_s = hold_timeout_s
        self.held: dict[str, tuple[KVHandle, float]] = {}  # request id -> (handle, deadline)

    def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Queue a request; raises ValueError if it can never run here."""
        self.engine.add_request(prompt, params, request_id)

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> list[PrefillResult]:
        start = time.time()
        plan, deltas = self.engine.run_step()
        end = time.time()
        if plan is None:
            return []
        return [self._publish(seq, delta, start, end) for seq, delta in zip(plan.seqs, deltas)]

    def _publish(self, seq, delta: TokenDelta, start: float, end: float) -> PrefillResult:
        if delta.finished:  # e.g. max_tokens=1 or EOS first: nothing to hand over
            return PrefillResult(delta, None, None, start, end)
        self.engine.scheduler.detach(seq)
        blocks = self.engine.blocks.tables[seq.request_id]
        # The newest token has no KV yet: the decode side computes it in its first step.
        handle = self.transport.export(self.engine.runner.kv_cache, seq.request_id, blocks,
                                       seq.num_tokens - 1)
        self.held[seq.request_id] = (handle, time.monotonic() + self.hold_timeout_s)
        return PrefillResult(delta, state_of(seq), handle, start, end)

    def ack(self, request_id: str) -> None:
        """The destination has the KV (or gave up): free the source blocks."""
        entry = self.held.pop(request_id, None)
        if entry is not None:
            self.transport.release(entry[0])
            self.engine.blocks.free(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self.ack(request_id)

    def reclaim_expired(self) -> list[str]:
        """Free exports nobody acked in time (a dead or stuck destination)."""
        now = time.monotonic()
        expired = [rid for rid, (_, deadline) in self.held.items() if deadline < now]
        for rid in expired:
            self.ack(rid)
        return expired

    def stats(self) -> dict[str, int]:
        queued = sum(s.num_tokens for s in self.engine.scheduler.waiting)
        return {**self.engine.stats(), "held": len(self.held), "queued_tokens": queued}
