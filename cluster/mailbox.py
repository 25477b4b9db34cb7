"""Mailboxes: one per client event loop, collecting every change to that client's streams so one
long poll returns all of them at once (pure asyncio, no Ray).

Without them each open stream keeps its own long poll on the router: thousands of streams are
thousands of concurrent actor calls, each answered separately. A mailbox turns that into one call
per client per round, carrying a chunk for every stream that moved since the last one.
"""
from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Posting(Protocol):
    request_id: str


class Mailbox:
    """The streams of one client that changed since its last poll (latest record per request)."""

    def __init__(self) -> None:
        self.ready: dict[str, Posting] = {}
        self.event = asyncio.Event()
        self.last_seen = time.monotonic()

    def post(self, rec: Posting) -> None:
        self.ready[rec.request_id] = rec
        self.event.set()

    def drop(self, request_id: str) -> None:
        self.ready.pop(request_id, None)

    async def take(self, timeout_s: float) -> list[Posting]:
        """Every posted record, waiting up to ``timeout_s`` for the first one."""
        self.last_seen = time.monotonic()
        if not self.ready:
            try:
                await asyncio.wait_for(self.event.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        taken, self.ready = list(self.ready.values()), {}
        self.event.clear()
        self.last_seen = time.monotonic()
        return taken


class Mailboxes:
    """The router's mailboxes by client-chosen id; one nobody has polled for ``idle_s`` goes."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.boxes: dict[str, Mailbox] = {}

    def __len__(self) -> int:
        return len(self.boxes)

    def get(self, mailbox_id: str) -> Mailbox:
        box = self.boxes.get(mailbox_id)
        if box is None:
            box = self.boxes[mailbox_id] = Mailbox()
        return box

    def expire(self, now: float) -> int:
        """Drop mailboxes idle past ``idle_s`` (their client went away); how many."""
        idle = [key for key, box in self.boxes.items() if now - box.last_seen > self.idle_s]
        for key in idle:
            del self.boxes[key]
        return len(idle)
