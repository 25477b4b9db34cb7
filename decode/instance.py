"""DecodeInstance: admits requests with their KV, decodes them with continuous batching.

Admission: reserve blocks for the request's KV (or queue the admission, FIFO, until blocks free
up), pull the KV through the transport into them, then join the running batch. A failed pull
frees the reservation and is reported, never retried here (the router decides).
The engine keeps prefill enabled only so that preempted requests can be recomputed; colocated
mode also submits raw prompts here.
"""
from __future__ import annotations

from collections import deque

import msgspec

from engine.engine import Engine
from engine.outputs import TokenDelta
from engine.params import SamplingParams
from transfer.base import TransferError, Transport
from transfer.messages import KVHandle, RequestState
from transfer.state import sequence_from


class StepReport(msgspec.Struct, frozen=True):
    """One message per step: every running request's new tokens plus admission outcomes."""

    deltas: list[TokenDelta]
    admitted: list[str]
    failed: list[tuple[str, str]]  # (request id, error)
    free_blocks: int


class DecodeInstance:
    def __init__(self, engine: Engine, transports: dict[str, Transport], timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.transports = transports
        self.timeout_s = timeout_s
        self.pending: deque[tuple[RequestState, KVHandle]] = deque()

    def admit(self, state: RequestState, handle: KVHandle) -> None:
        if handle.transport not in self.transports:
            raise ValueError(f"no {handle.transport!r} transport on this instance")
        self.pending.append((state, handle))

    def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Colocated mode: a raw request prefilled here."""
        self.engine.add_request(prompt, params, request_id)

    def has_work(self) -> bool:
        return bool(self.pending) or self.engine.has_unfinished()

    def step(self) -> StepReport:
        admitted, failed = self._admit_pending()
        deltas = self.engine.step()
        return StepReport(deltas, admitted, failed, self.engine.blocks.num_free)

    def _admit_pending(self) -> tuple[list[str], list[tuple[str, str]]]:
        admitted, failed = [], []
        blocks = self.engine.blocks
        while self.pending and blocks.can_allocate(self.pending[0][1].num_tokens):
            state, handle = self.pending.popleft()
            table = blocks.allocate(state.request_id, handle.num_tokens)
            try:
                self.transports[handle.transport].fetch(handle, self.engine.runner.kv_cache, table,
                                                        self.timeout_s)
            except TransferError as exc:
                blocks.free(state.request_id)
                failed.append((state.request_id, str(exc)))
                continue
            self.engine.scheduler.add_running(sequence_from(state))
            admitted.append(state.request_id)
        return admitted, failed

    def abort(self, request_id: str) -> bool:
        """Drop the request wherever it is here (queued admission or running)."""
        for item in list(self.pending):
            if item[0].request_id == request_id:
                self.pending.remove(item)
                return True
        return self.engine.abort(request_id) is not None

    def stats(self) -> dict[str, int]:
        return {**self.engine.stats(), "pending_admissions": len(self.pending)}
