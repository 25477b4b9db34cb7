"""Exports a source instance holds for a destination: the request is off its schedule, its blocks
kept and published through the transport, until the destination has pulled them (``release``),
the hand-over went nowhere (``resume``: the request runs on here), or nobody answered within the
hold timeout (``reclaim_expired``: the blocks go back). Used by prefill instances for every
request and by decode instances for the requests they migrate away. No Ray."""
from __future__ import annotations

import time

import msgspec

from tandem.engine.handover import HandoverEngine
from tandem.transfer.base import Transport
from tandem.transfer.protocol import KVHandle, RequestState


class ExportHolds:
    """Also holds requests that leave without their KV (``withdraw``, ``detach``): nothing is
    published, and ``resume`` puts a withdrawn one back in the waiting queue here."""

    def __init__(self, engine: HandoverEngine, transport: Transport, hold_timeout_s: float) -> None:
        self.engine, self.transport, self.hold_timeout_s = engine, transport, hold_timeout_s
        self._held: dict[str, tuple[KVHandle | None, float]] = {}  # request id -> (handle, deadline)
        self._withdrawn: dict[str, RequestState] = {}  # held requests that had no KV here

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._held

    def __iter__(self):
        return iter(list(self._held))

    def export(self, request_id: str, first_block: int = 0) -> tuple[RequestState, KVHandle]:
        """Take a running request off the schedule and publish its KV from its ``first_block``-th
        block on (the blocks before went in pre-copy stages); ValueError if it is not running here."""
        export = self.engine.export(request_id)
        handle = self.transport.export(self.engine.kv_cache, request_id, export.block_ids[first_block:],
                                       export.num_kv_tokens)
        if first_block:
            handle = msgspec.structs.replace(handle, first_block=first_block)
        self._held[request_id] = (handle, time.monotonic() + self.hold_timeout_s)
        return export.state, handle

    def detach(self, request_id: str) -> RequestState:
        """Take a running request off the schedule, keeping its blocks, publishing nothing (it
        moves by recompute); ValueError if it is not running here."""
        export = self.engine.export(request_id)
        self._held[request_id] = (None, time.monotonic() + self.hold_timeout_s)
        return export.state

    def withdraw(self, request_id: str) -> RequestState:
        """Take a request that waits for its prefill off the schedule (it holds no KV);
        ValueError if it is not waiting here."""
        state = self.engine.withdraw(request_id)
        self._held[request_id] = (None, time.monotonic() + self.hold_timeout_s)
        self._withdrawn[request_id] = state
        return state

    def release(self, request_id: str) -> bool:
        """The destination has the request (or gave up for good): free what is held here."""
        return self._let_go(request_id, resume=False)

    def resume(self, request_id: str) -> bool:
        """The hand-over failed before the destination took the request: it goes on here."""
        return self._let_go(request_id, resume=True)

    def _let_go(self, request_id: str, resume: bool) -> bool:
        """Unpublish an export, then free or resume it on the engine; False if not held."""
        entry = self._held.pop(request_id, None)
        if entry is None:
            return False
        if entry[0] is not None:
            self.transport.release(entry[0])
        state = self._withdrawn.pop(request_id, None)
        if state is not None:
            if resume:
                self.engine.recompute(state)
        elif resume:
            self.engine.resume(request_id)
        else:
            self.engine.release(request_id)
        return True

    def reclaim_expired(self, resume: bool = False) -> list[str]:
        """Exports nobody acked in time (a dead or stuck destination, a lost reply): freed, or
        with ``resume`` put back on the schedule (a decode instance's request goes on here; if
        the router has given it to another owner meanwhile, it stops it)."""
        now = time.monotonic()
        expired = [rid for rid, (_, deadline) in self._held.items() if deadline < now]
        for rid in expired:
            self.resume(rid) if resume else self.release(rid)
        return expired


class StageHolds:
    """Pre-copy stages a source has published: full blocks of a request that keeps decoding, each
    kept alive by an extra reference (so a preemption or finish meanwhile cannot hand them to
    another request) until the stage is released or its hold times out. One stage per request."""

    def __init__(self, engine: HandoverEngine, transport: Transport, hold_timeout_s: float) -> None:
        self.engine, self.transport, self.hold_timeout_s = engine, transport, hold_timeout_s
        self._held: dict[str, tuple[KVHandle, list[int], float]] = {}  # id -> (handle, blocks, deadline)

    def __len__(self) -> int:
        return len(self._held)

    def publish(self, request_id: str, first_block: int, min_blocks: int) -> KVHandle | None:
        """Publish the request's full blocks from ``first_block`` on; None (nothing held) if fewer
        than ``min_blocks`` are full. ValueError if it is not running here."""
        self.release(request_id)
        snapshot = self.engine.snapshot(request_id, first_block)
        if len(snapshot.block_ids) < max(1, min_blocks):
            self.engine.unshare(snapshot.block_ids)
            return None
        handle = self.transport.export(self.engine.kv_cache, f"{request_id}/from-block-{first_block}",
                                       snapshot.block_ids, snapshot.num_kv_tokens)
        handle = msgspec.structs.replace(handle, first_block=first_block)
        self._held[request_id] = (handle, snapshot.block_ids, time.monotonic() + self.hold_timeout_s)
        return handle

    def release(self, request_id: str, first_block: int | None = None) -> bool:
        """Unpublish the request's stage (only the one from ``first_block``, if given: a late
        release of an earlier stage leaves a later one alone), then drop its block references;
        False if none held."""
        entry = self._held.get(request_id)
        if entry is None or (first_block is not None and entry[0].first_block != first_block):
            return False
        del self._held[request_id]
        self.transport.release(entry[0])
        self.engine.unshare(entry[1])
        return True

    def release_all(self) -> None:
        for request_id in list(self._held):
            self.release(request_id)

    def reclaim_expired(self) -> list[str]:
        now = time.monotonic()
        expired = [rid for rid, (_, _, deadline) in self._held.items() if deadline < now]
        for rid in expired:
            self.release(rid)
        return expired
