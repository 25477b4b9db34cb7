"""PrefillInstance: prefill-only scheduling over the engine; publishes each request's KV.

After a request's prompt is prefilled and its first token sampled, the engine exports it (its
blocks are *held*, published through the transport) until the decode side acks the pull; then
they are released. Held blocks count against the cache, so a decode pool that cannot keep up
backs pressure up into prefill admission instead of into an OOM. A held export that is never
acked is reclaimed after ``hold_timeout_s``. Uses only the engine's step and hand-over API.
"""
from __future__ import annotations

import time

from tandem.engine.handover import HandoverEngine
from tandem.engine.outputs import TokenDelta
from tandem.engine.params import SamplingParams
from tandem.transfer.base import Transport
from tandem.transfer.holds import ExportHolds
from tandem.transfer.protocol import PrefillResult


class PrefillInstance:
    def __init__(self, engine: HandoverEngine, transport: Transport, hold_timeout_s: float = 60.0) -> None:
        if engine.config.scheduler.enable_decode:
            raise ValueError("a prefill instance needs an engine scheduled with enable_decode=False")
        self.engine = engine
        self.transport = transport
        self.held = ExportHolds(engine, transport, hold_timeout_s)

    def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Queue a request; raises ValueError if it can never run here."""
        self.engine.add_request(prompt, params, request_id)

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> list[PrefillResult]:
        start = time.time()
        deltas = self.engine.step()
        end = time.time()
        return [self._publish(delta, start, end) for delta in deltas]

    def _publish(self, delta: TokenDelta, start: float, end: float) -> PrefillResult:
        if delta.finished:  # e.g. max_tokens=1 or EOS first: nothing to hand over
            return PrefillResult(delta, None, None, start, end)
        state, handle = self.held.export(delta.request_id)
        return PrefillResult(delta, state, handle, start, end)

    def ack(self, request_id: str) -> None:
        """The destination has the KV (or gave up): free the source blocks."""
        self.held.release(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self.ack(request_id)

    def abort_all(self) -> int:
        """Drop every request here, queued, running or held for a destination; how many."""
        request_ids = {*self.engine.request_ids(), *self.held}
        for rid in request_ids:
            self.abort(rid)
        return len(request_ids)

    def reclaim_expired(self) -> list[str]:
        """Free exports nobody acked in time (a dead or stuck destination)."""
        return self.held.reclaim_expired()

    def stats(self) -> dict[str, int]:
        stats = self.engine.stats()
        return {**stats, "held": len(self.held), "queued_tokens": stats["waiting_tokens"]}
