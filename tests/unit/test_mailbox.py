"""Mailboxes: a client's streams' changes collected for one poll; idle ones expire."""
from __future__ import annotations

import asyncio

from tandem.cluster.mailbox import Mailboxes
from tandem.cluster.requests import RequestRecord
from tandem.engine.outputs import TokenDelta
from tandem.engine.params import SamplingParams


def _record(rid: str, box) -> RequestRecord:
    rec = RequestRecord(rid, [1, 2], SamplingParams())
    rec.mailbox = box
    return rec


def test_one_take_returns_every_changed_stream_once():
    async def run():
        box = Mailboxes(idle_s=60).get("client-a")
        a, b, c = (_record(r, box) for r in "abc")
        a.add_delta(TokenDelta("a", [5], "x", 0), 1.0)
        a.add_delta(TokenDelta("a", [6], "y", 1), 1.0)  # a second change: still one entry
        c.finish("abort")
        taken = await box.take(timeout_s=0.01)
        assert sorted(r.request_id for r in taken) == ["a", "c"]
        assert await box.take(timeout_s=0.01) == []  # nothing new since
        b.add_delta(TokenDelta("b", [7], "z", 0), 1.0)
        assert [r.request_id for r in await box.take(timeout_s=0.01)] == ["b"]
    asyncio.run(run())


def test_a_take_waits_for_the_first_change():
    async def run():
        box = Mailboxes(idle_s=60).get("client-a")
        rec = _record("a", box)
        waiter = asyncio.ensure_future(box.take(timeout_s=5))
        await asyncio.sleep(0)
        assert not waiter.done()
        rec.add_delta(TokenDelta("a", [5], "x", 0), 1.0)
        assert [r.request_id for r in await asyncio.wait_for(waiter, 1)] == ["a"]
    asyncio.run(run())


def test_mailboxes_nobody_polls_expire():
    async def run():
        boxes = Mailboxes(idle_s=10)
        old, fresh = boxes.get("old"), boxes.get("fresh")
        old.last_seen -= 11
        assert boxes.expire(fresh.last_seen) == 1
        assert list(boxes.boxes) == ["fresh"] and boxes.get("fresh") is fresh
    asyncio.run(run())
