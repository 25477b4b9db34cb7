"""Dispatch's running load totals agree with the per-request tables they summarise."""
from __future__ import annotations

import random

import pytest

from tandem.cluster.dispatch import Dispatcher
from tandem.engine.block_manager import blocks_needed


class _Rec:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id


def test_totals_match_the_tables_through_random_traffic():
    rng = random.Random(0)
    d = Dispatcher()
    for i in range(3):
        d.add_prefill(f"p{i}")
        d.set_free_blocks(f"d{i}", 100, block_size=16)
    live: list[str] = []
    for step in range(2000):
        op = rng.random()
        if op < 0.4:
            rid = f"r{step}"
            d.pick_prefill(rid, rng.randint(1, 300))
            d.pick_decode(rid, rng.randint(1, 300))
            live.append(rid)
        elif op < 0.6 and live:
            rid = live.pop(rng.randrange(len(live)))
            d.forget(_Rec(rid))
        elif op < 0.8 and live:
            rid = rng.choice(live)
            for iid in d.queued:
                d.prefill_done(iid, rid)
        elif live:
            rid = rng.choice(live)
            for iid in d.reserved:
                d.admitted(iid, rid)
        if step == 1000:
            d.remove_instance("p1")
            d.remove_instance("d2")
        for iid, table in d.queued.items():
            assert d.queued_total[iid] == sum(table.values())
        for iid, table in d.reserved.items():
            assert d.free_estimate(iid) == 100 - sum(table.values())


def test_least_tokens_and_most_free_blocks_pick_by_load():
    d = Dispatcher()
    for iid in ("p0", "p1"):
        d.add_prefill(iid)
    d.set_free_blocks("d0", 10, block_size=16)
    d.set_free_blocks("d1", 12, block_size=16)
    assert d.pick_prefill("a", 100) == "p0"  # tie: by name
    assert d.pick_prefill("b", 10) == "p1"
    assert d.pick_prefill("c", 10) == "p1"  # 20 queued there against 100
    assert d.pick_decode("a", 64) == "d1"  # 12 free
    assert d.free_estimate("d1") == 12 - blocks_needed(64, 16)
    assert d.pick_decode("b", 16) == "d0"  # 10 against 8


def test_freeness_picks_the_most_free_blocks_per_request():
    d = Dispatcher(decode_policy="freeness")
    d.set_free_blocks("d0", 40, block_size=16, running=1)  # 40 per request
    d.set_free_blocks("d1", 60, block_size=16, running=5)  # 10 per request, more blocks in all
    assert d.pick_decode("a", 16) == "d0"  # 40 against 12 free blocks per request
    assert d.pick_decode("b", 16) == "d0"  # 39 / 2 against 12
    assert d.pick_decode("c", 16) == "d0"  # 38 / 3 against 12
    assert d.pick_decode("d", 16) == "d1"  # 37 / 4 against 12
    d.admitted("d0", "a")  # no longer reserved; the next report counts it among d0's requests
    assert d.freeness("d0") == (40 - 2) / 3


def test_a_draining_instance_gets_no_new_requests_under_any_policy():
    for policy in ("most_free_blocks", "freeness", "round_robin"):
        d = Dispatcher(decode_policy=policy)
        d.set_free_blocks("d0", 100, block_size=16)
        d.set_free_blocks("d1", 1, block_size=16)
        d.drain("d0")
        assert {d.pick_decode(f"r{i}", 16) for i in range(6)} == {"d1"}
        assert d.freest_decode() == "d1" and d.freest_decode(exclude="d1") is None
        d.drain("d1")
        with pytest.raises(RuntimeError, match="no live decode instance"):
            d.pick_decode("x", 16)
