"""DecodeInstance: admits requests with their KV, decodes them with continuous batching.

Admission: reserve blocks for the request's KV (or queue the admission, FIFO, until blocks free
up), pull the KV through the transport into them, then join the running batch. A failed pull
releases the reservation and is reported, never retried here (the router decides).
The engine keeps prefill enabled only so that preempted requests can be recomputed; colocated
mode also submits raw prompts here. Uses only the engine's step and hand-over API.
"""
from __future__ import annotations

from collections import deque

from tandem.engine.handover import HandoverEngine
from tandem.engine.params import SamplingParams
from tandem.transfer.base import TransferError, Transport
from tandem.transfer.protocol import KVHandle, RequestState, StepReport


class DecodeInstance:
    def __init__(self, engine: HandoverEngine, transports: dict[str, Transport], timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.transports = transports
        self.timeout_s = timeout_s
        self.pending: deque[tuple[RequestState, KVHandle]] = deque()

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
        return bool(self.pending) or self.engine.has_unfinished()

    def step(self) -> StepReport:
        admitted, failed = self._admit_pending()
        deltas = self.engine.step()
        return StepReport(deltas, admitted, failed, self.engine.num_free_blocks)

    def _admit_pending(self) -> tuple[list[str], list[tuple[str, str]]]:
        admitted, failed = [], []
        while self.pending:
            state, handle = self.pending[0]
            table = self.engine.reserve(state.request_id, handle.num_tokens)
            if table is None:
                break  # FIFO: wait for blocks to free up
            self.pending.popleft()
            try:
                self.transports[handle.transport].fetch(handle, self.engine.kv_cache, table, self.timeout_s)
            except TransferError as exc:
                self.engine.release(state.request_id)
                failed.append((state.request_id, str(exc)))
                continue
            self.engine.admit(state)
            admitted.append(state.request_id)
        return admitted, failed

    def abort(self, request_id: str) -> bool:
        """Drop the request wherever it is here (queued admission or running)."""
        for item in list(self.pending):
            if item[0].request_id == request_id:
                self.pending.remove(item)
                return True
        return self.engine.abort(request_id) is not None

    def abort_all(self) -> int:
        """Drop every request here, queued for admission or running; how many."""
        request_ids = [state.request_id for state, _ in self.pending] + self.engine.request_ids()
        self.pending.clear()
        for rid in self.engine.request_ids():
            self.engine.abort(rid)
            self.engine.release(rid)
        return len(request_ids)

    def stats(self) -> dict[str, int]:
        return {**self.engine.stats(), "pending_admissions": len(self.pending)}
