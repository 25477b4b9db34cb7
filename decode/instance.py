"""DecodeInstance: admits requests with their KV, decodes them with continuous batching.

Admission: reserve blocks for the request's KV (or queue the admission, FIFO, until blocks free
up), pull the KV through the transport into them beside the running steps (``decode/pulls.py``),
then join the running batch at the first step boundary after the pull lands. A failed pull
releases the reservation and is reported, never retried here (the router decides).
The engine keeps prefill enabled only so that preempted requests can be recomputed; colocated
mode also submits raw prompts here. Uses only the engine's step and hand-over API.
"""
from __future__ import annotations

from collections import deque
from functools import partial
from typing import Callable

from tandem.engine.handover import HandoverEngine
from tandem.decode.pulls import Pulls
from tandem.engine.params import SamplingParams
from tandem.transfer.base import TransferError, Transport
from tandem.transfer.holds import ExportHolds
from tandem.transfer.protocol import KVHandle, RequestState, StepReport


class DecodeInstance:
    def __init__(self, engine: HandoverEngine, transports: dict[str, Transport], timeout_s: float = 30.0,
                 hold_timeout_s: float = 60.0) -> None:
        self.engine = engine
        self.transports = transports
        self.timeout_s = timeout_s
        # Requests migrating away leave through the first transport, held until the router says.
        self.outgoing = ExportHolds(engine, next(iter(transports.values())), hold_timeout_s)
        self.pending: deque[tuple[RequestState, KVHandle]] = deque()  # waiting for blocks
        self.pulls = Pulls(wake=lambda: self.wake())
        self.wake: Callable[[], None] = lambda: None  # set by the host: a pull landed

    def admit(self, state: RequestState, handle: KVHandle) -> None:
        if handle.transport not in self.transports:
            raise ValueError(f"no {handle.transport!r} transport on this instance")
        self.pending.append((state, handle))

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
        return bool(self.pending) or self.engine.has_unfinished() or self.pulls.any_landed()

    def idle(self) -> bool:
        """Nothing to step and no KV in flight."""
        return not self.has_work() and not self.pulls

    def step(self) -> StepReport:
        admitted, failed = self._land_pulls()
        self._start_pulls()
        deltas = self.engine.step()
        return StepReport(deltas, admitted, failed, self.engine.num_free_blocks)

    def _start_pulls(self) -> None:
        """Reserve blocks for queued admissions, FIFO, and start pulling their KV."""
        batch = []
        while self.pending:
            state, handle = self.pending[0]
            table = self.engine.reserve(state.request_id, handle.num_tokens)
            if table is None:
                break  # FIFO: wait for blocks to free up
            self.pending.popleft()
            fetch = self.transports[handle.transport].fetch
            batch.append((state, partial(fetch, handle, self.engine.kv_cache, table, self.timeout_s)))
        self.pulls.start(batch)

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
        """Drop the request wherever it is here (queued admission, KV in flight, or running)."""
        for item in list(self.pending):
            if item[0].request_id == request_id:
                self.pending.remove(item)
                return True
        if self.pulls.cancel(request_id):
            return True  # its blocks are released when the pull lands
        if self.outgoing.release(request_id):
            return True  # it was migrating away
        return self.engine.abort(request_id) is not None

    def abort_all(self) -> int:
        """Drop every request here, queued for admission, in flight or running; how many."""
        in_flight = list(self.pulls.in_flight)
        for rid in in_flight:
            self.pulls.cancel(rid)
        outgoing = list(self.outgoing)
        for rid in outgoing:
            self.outgoing.release(rid)
        request_ids = [state.request_id for state, _ in self.pending] + [
            rid for rid in self.engine.request_ids() if rid not in self.pulls]
        self.pending.clear()
        for rid in request_ids:
            self.engine.abort(rid)
            self.engine.release(rid)
        return len(request_ids) + len(in_flight) + len(outgoing)

    # -- migration: this instance as the source ---------------------------------------------------

    def export(self, request_id: str) -> tuple[RequestState, KVHandle]:
        """Take a running request off the batch (at a step boundary) and publish its KV for
        another instance; it is held until ``release_export`` or ``resume_export``. ValueError if
        it is not running here (finished, waiting, unknown)."""
        return self.outgoing.export(request_id)

    def release_export(self, request_id: str) -> bool:
        """The destination committed the request: free its blocks here."""
        return self.outgoing.release(request_id)

    def resume_export(self, request_id: str) -> bool:
        """The migration failed before commit: the request decodes on here."""
        return self.outgoing.resume(request_id)

    def reclaim_expired(self) -> list[str]:
        """Outgoing requests the router neither committed nor resumed in time: freed."""
        return self.outgoing.reclaim_expired()

    def stats(self) -> dict[str, int]:
        return {**self.engine.stats(), "pending_admissions": len(self.pending) + len(self.pulls),
                "migrating_out": len(self.outgoing)}

    def close(self) -> None:
        self.pulls.close()
