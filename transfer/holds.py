"""Exports a source instance holds for a destination: the request is off its schedule, its blocks
kept and published through the transport, until the destination has pulled them (``release``),
the hand-over went nowhere (``resume``: the request runs on here), or nobody answered within the
hold timeout (``reclaim_expired``: the blocks go back). Used by prefill instances for every
request and by decode instances for the requests they migrate away. No Ray."""
from __future__ import annotations

import time

from tandem.engine.handover import HandoverEngine
from tandem.transfer.base import Transport
from tandem.transfer.protocol import KVHandle, RequestState


class ExportHolds:
    def __init__(self, engine: HandoverEngine, transport: Transport, hold_timeout_s: float) -> None:
        self.engine, self.transport, self.hold_timeout_s = engine, transport, hold_timeout_s
        self._held: dict[str, tuple[KVHandle, float]] = {}  # request id -> (handle, deadline)

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._held

    def __iter__(self):
        return iter(list(self._held))

    def export(self, request_id: str) -> tuple[RequestState, KVHandle]:
        """Take a running request off the schedule and publish its KV; ValueError if it is not
        running here."""
        export = self.engine.export(request_id)
        handle = self.transport.export(self.engine.kv_cache, request_id, export.block_ids,
                                       export.num_kv_tokens)
        self._held[request_id] = (handle, time.monotonic() + self.hold_timeout_s)
        return export.state, handle

    def release(self, request_id: str) -> bool:
        """The destination has the KV (or gave up for good): free the blocks here."""
        return self._let_go(request_id, self.engine.release)

    def resume(self, request_id: str) -> bool:
        """The hand-over failed before the destination took the request: it runs on here."""
        return self._let_go(request_id, self.engine.resume)

    def _let_go(self, request_id: str, then) -> bool:
        """Unpublish an export, then ``then(request_id)`` on the engine; False if not held."""
        entry = self._held.pop(request_id, None)
        if entry is None:
            return False
        self.transport.release(entry[0])
        then(request_id)
        return True

    def reclaim_expired(self) -> list[str]:
        """Free exports nobody acked in time (a dead or stuck destination)."""
        now = time.monotonic()
        expired = [rid for rid, (_, deadline) in self._held.items() if deadline < now]
        for rid in expired:
            self.release(rid)
        return expired
