"""The destination side of a migration's pre-copy stages: blocks reserved for a request that is
still decoding on its source, grown stage by stage and filled on the transfer thread, until the
final admission takes them over (only the blocks not copied yet are pulled then).

A reservation nobody finishes (the source or the router gave up) is freed after the hold timeout;
an aborted one whose stage is still copying keeps its blocks until the copy has stopped writing.
Runs on the instance's step thread, like everything that touches the engine. No Ray.
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial

from tandem.decode.pulls import Pulls
from tandem.engine.handover import HandoverEngine
from tandem.transfer.base import Transport
from tandem.transfer.protocol import KVHandle
from tandem.transfer.sharded import fetch_kv


@dataclass
class Stages:
    copied: int = 0  # blocks of the request in place here
    copying: Future | None = None  # the stage on the transfer thread
    copying_to: int = 0  # ``copied`` once that stage lands
    deadline: float = 0.0
    cancelled: bool = False  # aborted while a stage was copying: freed once it stops


class IncomingStages:
    def __init__(self, engine: HandoverEngine, pulls: Pulls, timeout_s: float, hold_timeout_s: float) -> None:
        self.engine, self.pulls = engine, pulls
        self.timeout_s, self.hold_timeout_s = timeout_s, hold_timeout_s
        self._stages: dict[str, Stages] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._stages

    def __len__(self) -> int:
        return len(self._stages)

    def receive(self, request_id: str, handle: KVHandle, transport: Transport) -> Future:
        """Reserve (or grow the reservation) for one stage's blocks and start copying them; the
        future ends when they are in place. ValueError (nothing changed) if the stage does not
        follow the last one or its blocks are not free."""
        table = self._grow(request_id, handle)
        entry = self._stages[request_id]
        end = handle.first_block + handle.num_blocks
        entry.copying_to, entry.deadline = end, time.monotonic() + self.hold_timeout_s
        entry.copying = self.pulls.run(partial(fetch_kv, transport, handle, self.engine.kv_cache,
                                               table[handle.first_block:end], self.timeout_s))
        return entry.copying

    def _grow(self, request_id: str, handle: KVHandle) -> list[int]:
        """Reserve (or grow the reservation) up to the end of ``handle``'s blocks, which must
        start where the blocks in place end; the whole block table. ValueError if refused."""
        entry = self._settled(request_id)
        copied = 0 if entry is None else entry.copied
        if handle.first_block != copied:
            raise ValueError(f"request {request_id!r}: its KV from block {handle.first_block} does "
                             f"not follow the {copied} blocks here")
        if entry is None:
            table = self.engine.reserve(request_id, handle.num_tokens)
        else:
            table = self.engine.extend(request_id, handle.num_tokens)
        if table is None:
            raise ValueError(f"request {request_id!r}: no room for {handle.num_tokens} tokens of KV "
                             f"({self.engine.num_free_blocks} blocks free)")
        self._stages.setdefault(request_id, Stages())
        return table

    def copied(self, request_id: str) -> int:
        """Blocks of the request in place here (0: none reserved). ValueError if a stage is still
        copying or the last one failed."""
        entry = self._settled(request_id)
        return 0 if entry is None else entry.copied

    def reserve_final(self, request_id: str, handle: KVHandle) -> None:
        """A migration's final stage: blocks for the request's whole KV now (after its stages, or
        with none), so that it joins without queueing behind other admissions; ValueError
        (nothing changed) if they are not free or the stage does not follow the blocks here."""
        self._grow(request_id, handle)
        self._stages[request_id].deadline = time.monotonic() + self.hold_timeout_s

    def extend_for_final(self, request_id: str, num_tokens: int) -> list[int] | None:
        """The final stage: grow the reservation to the request's whole KV and hand it over (the
        request leaves this table); None (nothing changed) if the blocks are not free yet."""
        table = self.engine.extend(request_id, num_tokens)
        if table is not None:
            del self._stages[request_id]
        return table

    def _settled(self, request_id: str) -> Stages | None:
        entry = self._stages.get(request_id)
        if entry is None or entry.copying is None:
            return entry
        if not entry.copying.done():
            raise ValueError(f"request {request_id!r}: its previous stage is still copying")
        if entry.copying.exception() is not None:
            raise ValueError(f"request {request_id!r}: its previous stage failed: {entry.copying.exception()}")
        entry.copied, entry.copying = entry.copying_to, None
        return entry

    def abort(self, request_id: str) -> bool:
        """Drop the request's reservation (once its copying stage, if any, has stopped)."""
        entry = self._stages.get(request_id)
        if entry is None:
            return False
        if entry.copying is not None and not entry.copying.done():
            entry.cancelled = True
        else:
            self._free(request_id)
        return True

    def abort_all(self) -> int:
        request_ids = list(self._stages)
        for rid in request_ids:
            self.abort(rid)
        return len(request_ids)

    def reclaim(self) -> list[str]:
        """Free reservations aborted while copying (once the copy stopped) and those nobody
        finished within the hold timeout; the ids of the timed-out ones."""
        now, expired = time.monotonic(), []
        for rid, entry in list(self._stages.items()):
            busy = entry.copying is not None and not entry.copying.done()
            if busy:
                continue
            if entry.cancelled or entry.deadline < now:
                if not entry.cancelled:
                    expired.append(rid)
                self._free(rid)
        return expired

    def _free(self, request_id: str) -> None:
        del self._stages[request_id]
        self.engine.release(request_id)
