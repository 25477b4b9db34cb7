"""DecodeInstance: admits requests with their KV, decodes them with continuous batching.

Admission: reserve blocks for the request's KV (or queue the admission, FIFO, until blocks free
up), pull the KV through the transport into them beside the running steps (``decode/pulls.py``),
then join the running batch at the first step boundary after the pull lands. A failed pull
releases the reservation and is reported, never retried here (the router decides).
The engine keeps prefill enabled only so that preempted requests can be recomputed; colocated
mode also submits raw prompts here. Uses only the engine's step and hand-over API.
"""
from __future__ import annotations

import time
from collections import deque
from functools import partial
from typing import Callable

from concurrent.futures import Future

from tandem.decode.incoming import IncomingStages
from tandem.decode.pulls import Pulls
from tandem.engine.handover import HandoverEngine
from tandem.engine.params import SamplingParams
from tandem.transfer.base import TransferError, Transport
from tandem.transfer.holds import ExportHolds, StageHolds
from tandem.transfer.protocol import KVHandle, RequestState, StepReport
from tandem.transfer.sharded import fetch_kv


# Blocks per step copied on the step thread itself when the transport never waits (shm): a few
# blocks copy in well under a millisecond, and the request then joins this step, not a later one.
SYNC_COPY_BLOCKS = 8


class DecodeInstance:
    def __init__(self, engine: HandoverEngine, transports: dict[str, Transport], timeout_s: float = 30.0,
                 hold_timeout_s: float = 60.0) -> None:
        self.engine = engine
        self.transports = transports
        self.timeout_s = timeout_s
        # Requests migrating away leave through the first transport, held until the router says.
        first = next(iter(transports.values()))
        self.outgoing = ExportHolds(engine, first, hold_timeout_s)
        self.stages_out = StageHolds(engine, first, hold_timeout_s)  # pre-copy stages published
        self.pending: deque[tuple[RequestState, KVHandle]] = deque()  # waiting for blocks
        self.pulls = Pulls(wake=lambda: self.wake())
        self.stages_in = IncomingStages(engine, self.pulls, timeout_s, hold_timeout_s)
        self._refused: list[tuple[str, str]] = []  # admissions that failed before their pull
        self._joined: list[str] = []  # migrations admitted outside a step, reported by the next
        self.wake: Callable[[], None] = lambda: None  # set by the host: a pull landed

    def admit(self, state: RequestState, handle: KVHandle) -> None:
        """Queue an admission; a migration's final stage (``handle.first_block`` > 0) must follow
        the blocks its pre-copy stages put here. ValueError if it cannot be taken."""
        if handle.transport not in self.transports:
            raise ValueError(f"no {handle.transport!r} transport on this instance")
        if handle.first_block != self.stages_in.copied(state.request_id):
            raise ValueError(f"request {state.request_id!r}: its KV from block {handle.first_block} "
                             f"does not follow the {self.stages_in.copied(state.request_id)} blocks here")
        self.pending.append((state, handle))

    def admit_migration(self, state: RequestState, handle: KVHandle) -> None:
        """A migration's final stage: its blocks are reserved now and it goes ahead of queued
        admissions (the request is paused on its source meanwhile). ValueError if refused."""
        if handle.transport not in self.transports:
            raise ValueError(f"no {handle.transport!r} transport on this instance")
        self.stages_in.reserve_final(state.request_id, handle)
        transport = self.transports[handle.transport]
        if handle.num_blocks <= SYNC_COPY_BLOCKS and _never_waits(transport, handle):
            table = self.stages_in.extend_for_final(state.request_id, handle.num_tokens)  # reserved
            error = self._join_now(state, handle, table)  # joins the next step, no pull round
            if error is not None:
                raise ValueError(f"request {state.request_id!r}: its last blocks could not be copied: {error}")
        else:
            self.pending.appendleft((state, handle))

    def _join_now(self, state: RequestState, handle: KVHandle, table: list[int]) -> str | None:
        """Copy the request's KV into its reserved ``table`` here and now and put it in the batch
        (reported as admitted by the next step report); why the copy failed (its blocks freed)."""
        transport = self.transports[handle.transport]
        try:
            fetch_kv(transport, handle, self.engine.kv_cache, table[handle.first_block:], self.timeout_s)
        except TransferError as exc:
            self.engine.release(state.request_id)
            return str(exc)
        self.engine.admit(state)
        self._joined.append(state.request_id)
        return None

    def admit_all(self, items: list[tuple[RequestState, KVHandle]]) -> list[tuple[str, str]]:
        """``admit`` each; returns (request id, why) for those refused, the rest are queued."""
        refused = []
        for state, handle in items:
            try:
                self.admit(state, handle)
            except ValueError as exc:
                refused.append((state.request_id, str(exc)))
        return refused

    def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Colocated mode: a raw request prefilled here."""
        self.engine.add_request(prompt, params, request_id)

    def has_work(self) -> bool:
        """Whether a step now would do something (a pull still copying is not: it wakes the host)."""
        return (bool(self.pending) or self.engine.has_unfinished() or self.pulls.any_landed()
                or bool(self._refused) or bool(self._joined))

    def idle(self) -> bool:
        """Nothing to step and no KV in flight."""
        return not self.has_work() and not self.pulls

    def step(self) -> StepReport:
        started = time.time()
        admitted, failed = self._land_pulls()
        self._start_pulls()
        admitted += self._joined
        failed += self._refused
        self._joined, self._refused = [], []
        deltas = self.engine.step()
        return StepReport(deltas, admitted, failed, self.engine.num_free_blocks, self.engine.num_preemptions,
                          started, self.engine.num_scheduled)

    def _start_pulls(self) -> None:
        """Reserve blocks for queued admissions, FIFO, and start pulling their KV (for a
        migration's final stage only the blocks its pre-copy stages did not bring); up to
        ``SYNC_COPY_BLOCKS`` blocks over a transport that never waits are copied right here."""
        batch, copy_now = [], SYNC_COPY_BLOCKS
        while self.pending:
            state, handle = self.pending[0]
            try:
                table = self._reserve_for(state.request_id, handle)
            except ValueError as exc:  # its pre-copied blocks were dropped meanwhile
                self.pending.popleft()
                self._refused.append((state.request_id, str(exc)))
                continue
            if table is None:
                break  # FIFO: wait for blocks to free up
            self.pending.popleft()
            transport = self.transports[handle.transport]
            if handle.num_blocks <= copy_now and _never_waits(transport, handle):
                copy_now -= handle.num_blocks
                error = self._join_now(state, handle, table)
                if error is not None:
                    self._refused.append((state.request_id, error))
                continue
            batch.append((state, partial(fetch_kv, transport, handle, self.engine.kv_cache,
                                         table[handle.first_block:], self.timeout_s)))
        self.pulls.start(batch)

    def _reserve_for(self, request_id: str, handle: KVHandle) -> list[int] | None:
        if handle.first_block == 0 and request_id not in self.stages_in:
            return self.engine.reserve(request_id, handle.num_tokens)
        if self.stages_in.copied(request_id) != handle.first_block:
            raise ValueError(f"request {request_id!r}: its pre-copied blocks are no longer here")
        return self.stages_in.extend_for_final(request_id, handle.num_tokens)

    def _land_pulls(self) -> tuple[list[str], list[tuple[str, str]]]:
        """Landed pulls join the batch; failed ones give their blocks back and are reported."""
        admitted, failed = [], []
        for state, error, cancelled in self.pulls.take_landed():
            rid = state.request_id
            if cancelled or error is not None:
                self.engine.release(rid)
                if error is not None and not cancelled:
                    failed.append((rid, str(error) if isinstance(error, TransferError) else repr(error)))
                continue
            self.engine.admit(state)
            admitted.append(rid)
        return admitted, failed

    def abort(self, request_id: str) -> bool:
        """Drop the request wherever it is here (queued admission, KV in flight, pre-copied
        blocks, migrating away, or running); whether it was here at all."""
        queued = [item for item in self.pending if item[0].request_id == request_id]
        for item in queued:
            self.pending.remove(item)
        found = bool(queued)
        found |= self.pulls.cancel(request_id)  # its blocks are released when the pull lands
        found |= self.stages_in.abort(request_id)  # migrating here, in its pre-copy stages
        found |= self.stages_out.release(request_id)  # migrating away, still decoding here
        found |= self.outgoing.release(request_id)  # migrating away, paused here
        return (self.engine.abort(request_id) is not None) or found

    def abort_all(self) -> int:
        """Drop every request here, queued for admission, in flight or running; how many."""
        in_flight = list(self.pulls.in_flight)
        for rid in in_flight:
            self.pulls.cancel(rid)
        outgoing = list(self.outgoing)
        for rid in outgoing:
            self.outgoing.release(rid)
        self.stages_out.release_all()
        incoming = self.stages_in.abort_all()
        request_ids = [state.request_id for state, _ in self.pending] + [
            rid for rid in self.engine.request_ids() if rid not in self.pulls]
        self.pending.clear()
        for rid in request_ids:
            self.engine.abort(rid)
            self.engine.release(rid)
        return len(request_ids) + len(in_flight) + len(outgoing) + incoming

    # -- migration: this instance as the source ---------------------------------------------------

    def precopy(self, request_id: str, first_block: int, min_blocks: int = 1) -> KVHandle | None:
        """A pre-copy stage: publish the running request's full blocks from ``first_block`` on
        while it keeps decoding (None if fewer than ``min_blocks``); held until ``release_stage``.
        ValueError if it is not running here."""
        return self.stages_out.publish(request_id, first_block, min_blocks)

    def release_stage(self, request_id: str, first_block: int | None = None) -> bool:
        """The destination has the stage's blocks (or gave up): drop the stage here (only the
        one from ``first_block``, if given)."""
        return self.stages_out.release(request_id, first_block)

    def export(self, request_id: str, first_block: int = 0) -> tuple[RequestState, KVHandle]:
        """Take a running request off the batch (at a step boundary) and publish its KV from
        block ``first_block`` on (the earlier ones went in pre-copy stages); it is held until
        ``release_export`` or ``resume_export``. ValueError if it is not running here (finished,
        waiting, unknown)."""
        self.stages_out.release(request_id)
        return self.outgoing.export(request_id, first_block)

    def withdraw(self, request_id: str) -> RequestState:
        """Re-dispatch, source side: a request still waiting for its prefill here (queued in
        colocated mode, or preempted) leaves with its state, held until ``release_export`` or
        ``resume_export`` (back in the queue here); ValueError if it is not waiting."""
        return self.outgoing.withdraw(request_id)

    def detach(self, request_id: str) -> RequestState:
        """Migration by recompute, source side: the running request leaves the batch at a step
        boundary with its state; its blocks are held as an export's (nothing is published)."""
        self.stages_out.release(request_id)
        return self.outgoing.detach(request_id)

    # -- migration: this instance as the destination ---------------------------------------------

    def receive_stage(self, request_id: str, handle: KVHandle) -> Future:
        """A pre-copy stage of a request migrating here: reserve its blocks and copy them beside
        the running steps; the future ends once they are in place. ValueError if refused."""
        if handle.transport not in self.transports:
            raise ValueError(f"no {handle.transport!r} transport on this instance")
        return self.stages_in.receive(request_id, handle, self.transports[handle.transport])

    def recompute(self, state: RequestState) -> None:
        """A request moved here without its KV (re-dispatched, or migrating by recompute): it
        waits for a prefill here and is reported as admitted by the next step report (the
        router then frees it on its source). ValueError if it cannot be taken."""
        self.engine.recompute(state)
        self._joined.append(state.request_id)

    def release_export(self, request_id: str) -> bool:
        """The destination committed the request: free its blocks here."""
        return self.outgoing.release(request_id)

    def resume_export(self, request_id: str) -> bool:
        """The migration failed before commit: the request decodes on here."""
        return self.outgoing.resume(request_id)

    def reclaim_expired(self) -> list[str]:
        """Migrations the router neither committed nor resumed in time: requests migrating away
        go on here, stages and reservations are freed."""
        return [*self.outgoing.reclaim_expired(resume=True), *self.stages_out.reclaim_expired(),
                *self.stages_in.reclaim()]

    def stats(self) -> dict[str, int]:
        return {**self.engine.stats(), "pending_admissions": len(self.pending) + len(self.pulls),
                "migrating_out": len(self.outgoing) + len(self.stages_out),
                "migrating_in": len(self.stages_in)}

    def close(self) -> None:
        self.pulls.close()


def _never_waits(transport: Transport, handle: KVHandle) -> bool:
    """Whether fetching ``handle`` only copies local memory (so it may run on the step thread)."""
    check = getattr(transport, "never_waits", None)
    return check is not None and check(handle)
