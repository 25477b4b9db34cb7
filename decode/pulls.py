"""KV pulls beside the decode steps: admissions copy their KV on a transfer thread while the
instance's thread keeps stepping the running batch, so a slow pull (up to the transfer timeout)
never delays a running request.

The instance's thread starts a pull into blocks it has reserved and collects finished pulls at
step boundaries; only then does a request join the batch or give its blocks back. A pull is never
abandoned mid-copy: a cancelled one (its request aborted meanwhile) keeps its blocks until it has
stopped writing them. One transfer thread: transports' own state (an NCCL communicator, say) is
then never used from two threads at once.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, NamedTuple

from tandem.transfer.protocol import RequestState


class Landed(NamedTuple):
    state: RequestState
    error: BaseException | None  # why the pull failed, or None
    cancelled: bool  # the request was aborted while its KV was in flight


class Pulls:
    def __init__(self, wake: Callable[[], None]) -> None:
        """``wake()`` runs on the transfer thread when a pull ends (to wake an idle step loop)."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kv-pull")
        self._wake = wake
        self.in_flight: dict[str, tuple[RequestState, Future, int]] = {}  # id -> (state, batch, index)
        self.cancelled: set[str] = set()

    def __len__(self) -> int:
        return len(self.in_flight)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.in_flight

    def start(self, batch: list[tuple[RequestState, Callable[[], None]]]) -> None:
        """Pull a step's admissions, one after another, as one task on the transfer thread (one
        wake-up for all of them)."""
        if not batch:
            return
        future = self._executor.submit(_copy_all, [copy for _, copy in batch])
        future.add_done_callback(lambda _: self._wake())
        for index, (state, _) in enumerate(batch):
            self.in_flight[state.request_id] = (state, future, index)

    def run(self, copy: Callable[[], None]) -> Future:
        """One copy on the transfer thread that joins no batch (a migration's pre-copy stage);
        its future says when it is done and what it raised."""
        future = self._executor.submit(copy)
        future.add_done_callback(lambda _: self._wake())
        return future

    def any_landed(self) -> bool:
        return any(future.done() for _, future, _ in self.in_flight.values())

    def take_landed(self) -> list[Landed]:
        """Pulls that have ended, in the order they were started; they leave the in-flight set."""
        landed = []
        for rid, (state, future, index) in list(self.in_flight.items()):
            if future.done():
                del self.in_flight[rid]
                cancelled = rid in self.cancelled
                self.cancelled.discard(rid)
                failure = future.exception() or future.result()[index]
                landed.append(Landed(state, failure, cancelled))
        return landed

    def cancel(self, request_id: str) -> bool:
        """Mark an in-flight pull's request aborted (its blocks are released once it lands)."""
        if request_id not in self.in_flight:
            return False
        self.cancelled.add(request_id)
        return True

    def close(self) -> None:
        """Cancel pulls not started; wait for the one copying (bounded by its transfer timeout),
        so nothing writes into a cache that is about to be unmapped."""
        self._executor.shutdown(wait=True, cancel_futures=True)


def _copy_all(copies: list[Callable[[], None]]) -> list[BaseException | None]:
    """Run each copy; what each raised (None if it succeeded), so one failure fails only its own."""
    failures: list[BaseException | None] = []
    for copy in copies:
        try:
            copy()
            failures.append(None)
        except Exception as exc:
            failures.append(exc)
    return failures
