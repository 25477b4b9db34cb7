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
from tandem.transfer.protocol import KVHandle, RequestState, StepReport


class DecodeInstance:
    def __init__(self, engine: HandoverEngine, transports: dict[str, Transport], timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.transports = transports
        self.timeout_s = timeout_s
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
        while self.pending:
            state, handle = self.pending[0]
            table = self.engine.reserve(state.request_id, handle.num_tokens)
            if table is None:
                break  # FIFO: wait for blocks to free up
            self.pending.popleft()
            fetch = self.transports[handle.transport].fetch
            self.pulls.start(state, partial(fetch, handle, self.engine.kv_cache, table, self.timeout_s))

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
        return self.engine.abort(request_id) is not None

    def abort_all(self) -> int:
        """Drop every request here, queued for admission, in flight or running; how many."""
        in_flight = list(self.pulls.in_flight)
        for rid in in_flight:
            self.pulls.cancel(rid)
        request_ids = [state.request_id for state, _ in self.pending] + [
            rid for rid in self.engine.request_ids() if rid not in self.pulls]
        self.pending.clear()
        for rid in request_ids:
            self.engine.abort(rid)
            self.engine.release(rid)
        return len(request_ids) + len(in_flight)

    def stats(self) -> dict[str, int]:
        return {**self.engine.stats(), "pending_admissions": len(self.pending) + len(self.pulls)}

    def close(self) -> None:
        self.pulls.close()
