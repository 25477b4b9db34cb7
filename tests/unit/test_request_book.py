"""The router's request book stays bounded: aborted records leave the live set at once, finished
ones nobody reads after the TTL, into a bounded tail still readable once; generated ids never
collide with a caller's."""
from __future__ import annotations

import pytest

from tandem.cluster.requests import RequestBook
from tandem.engine.params import SamplingParams

PARAMS = SamplingParams(max_tokens=2)


def _finished(book: RequestBook, request_id: str | None, at: float) -> str:
    rec = book.add(request_id, [5, 6], PARAMS)
    rec.finish("length", now=at)
    return rec.request_id


def test_generated_ids_step_around_the_ones_callers_chose():
    book = RequestBook()
    book.add("req-0", [5], PARAMS)
    book.add("req-2", [5], PARAMS)
    generated = [book.add(None, [5], PARAMS).request_id for _ in range(3)]
    assert generated == ["req-1", "req-3", "req-4"]


def test_a_callers_id_in_use_live_or_retired_is_refused():
    book = RequestBook()
    rec = book.add("mine", [5], PARAMS)
    with pytest.raises(ValueError, match="request id 'mine' is already in use"):
        book.add("mine", [5], PARAMS)
    rec.finish("abort")
    book.retire(rec)
    with pytest.raises(ValueError, match="already in use"):  # still readable in the tail
        book.add("mine", [5], PARAMS)


def test_finished_records_nobody_reads_expire_after_the_ttl():
    book = RequestBook(result_ttl_s=10.0)
    old = [_finished(book, None, at=100.0) for _ in range(5)]
    running = book.add(None, [5], PARAMS).request_id
    fresh = _finished(book, None, at=105.0)
    assert book.expire(now=109.0) == 0 and len(book) == 7
    assert book.expire(now=110.5) == 5  # strictly older than the TTL
    assert set(book.live) == {running, fresh}
    assert book.lookup(old[0]).finish_reason == "length"  # still readable once from the tail
    book.forget(old[0])
    assert old[0] not in book.live and book.get(old[0]) is None


def test_the_retired_tail_is_bounded_and_keeps_the_newest():
    book = RequestBook(retired_max=3)
    for i in range(1000):
        rec = book.add(f"r{i}", [5], PARAMS)
        rec.finish("abort")
        book.retire(rec)
    assert len(book) == 0
    for rid in ("r997", "r998", "r999"):
        assert book.lookup(rid).finish_reason == "abort"
    with pytest.raises(KeyError, match="unknown request id 'r996'"):
        book.lookup("r996")
