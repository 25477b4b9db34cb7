"""Client side of the router's mailboxes: every ``astream`` of one client on one event loop reads
through one long poll (``Router.poll_mailbox``) instead of one per stream.

The hub names its streams' request ids itself (a random prefix and a counter), so a stream's
queue exists before its request is submitted and no chunk can arrive for a stream not yet open.
"""
from __future__ import annotations

import asyncio
import itertools
import uuid

from tandem.transfer.protocol import StreamChunk

POLL_S = 10.0  # one poll waits at most this long on the router for new tokens


class StreamHub:
    """Routes each chunk of the mailbox's polls to its stream's queue. A poll that fails (the
    router died, or did not answer) is delivered to every open stream as the exception."""

    def __init__(self, router, answer_timeout_s: float) -> None:
        self.router = router
        self.answer_timeout_s = answer_timeout_s
        self.mailbox_id = uuid.uuid4().hex
        self._ids = itertools.count()
        self.queues: dict[str, asyncio.Queue] = {}
        self._pump: asyncio.Task | None = None

    def new_request_id(self) -> str:
        return f"stream-{self.mailbox_id[:12]}-{next(self._ids)}"

    def open(self, request_id: str) -> asyncio.Queue:
        """The queue of one stream's chunks (or of the exception that ended the hub's polls)."""
        queue = self.queues[request_id] = asyncio.Queue()
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._run())
        return queue

    def close(self, request_id: str) -> None:
        self.queues.pop(request_id, None)

    async def _run(self) -> None:
        """Poll while any stream is open; hand each chunk to its stream."""
        try:
            while self.queues:
                ref = self.router.poll_mailbox.remote(self.mailbox_id, POLL_S)
                chunks: list[StreamChunk] = await asyncio.wait_for(ref, POLL_S + self.answer_timeout_s)
                for chunk in chunks:
                    queue = self.queues.get(chunk.request_id)
                    if queue is not None:  # else a stream that was closed (aborted) meanwhile
                        queue.put_nowait(chunk)
        except BaseException as exc:  # every open stream learns why its chunks stopped
            for queue in self.queues.values():
                queue.put_nowait(exc)
            if not isinstance(exc, Exception):
                raise
