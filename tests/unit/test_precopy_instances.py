"""A migration's pre-copy stages between two decode instances, without Ray: the request keeps
decoding on the source while its full blocks are copied, stage after stage; the final stage moves
only the rest, and the tokens match transformers. Blocks a stage publishes outlive the request's
own end on the source until the stage is released, and every block comes back on both sides
whatever ends the migration."""
from __future__ import annotations

import threading
import time

import pytest

from tandem.decode.instance import DecodeInstance
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.scheduler import SchedulerConfig
from tandem.prefill.instance import PrefillInstance
from tandem.transfer.local import LocalTransport
from tests.reference import hf_greedy
from tests.unit.test_migration_instances import MAX_TOKENS, PROMPT, _start, _steps

BLOCKS = 40
BLOCK_SIZE = 4


class HeldStages(LocalTransport):
    """Stage fetches wait (on the transfer thread) while ``hold`` is set, until ``go`` is."""

    def __init__(self) -> None:
        super().__init__()
        self.hold, self.go, self.waiting = False, threading.Event(), threading.Event()

    def fetch(self, handle, kv_cache, block_ids, timeout_s):
        if self.hold and "/from-block-" in handle.request_id:
            self.waiting.set()
            assert self.go.wait(30), "the test never let the stage go"
        super().fetch(handle, kv_cache, block_ids, timeout_s)


def _engine(model_dir, decode: bool) -> Engine:
    return Engine(model_dir, EngineConfig(dtype="float32", num_blocks=BLOCKS, block_size=BLOCK_SIZE,
                                          scheduler=SchedulerConfig(enable_decode=decode)))


@pytest.fixture
def trio(tiny_llama_dir):
    transport = HeldStages()
    prefill = PrefillInstance(_engine(tiny_llama_dir, False), transport)
    a, b = (DecodeInstance(_engine(tiny_llama_dir, True), {"local": transport}, hold_timeout_s=30)
            for _ in range(2))
    yield prefill, a, b, transport
    a.close()
    b.close()


def _stage(a, b, first_block: int) -> int:
    """One pre-copy stage; the blocks now on the destination."""
    handle = a.precopy("r", first_block)
    assert handle is not None and handle.first_block == first_block
    b.receive_stage("r", handle).result(timeout=30)
    assert a.release_stage("r")
    return first_block + handle.num_blocks


def _all_free(*instances) -> bool:
    return all(i.engine.num_free_blocks == BLOCKS and i.engine.stats()["held"] == 0 for i in instances)


def test_stages_copy_while_the_request_decodes_and_the_final_stage_moves_the_rest(trio, tiny_llama_dir):
    prefill, a, b, _ = trio
    tokens = _start(prefill, a)
    copied = _stage(a, b, 0)
    assert copied == (len(PROMPT) + len(tokens) - 1) // BLOCK_SIZE  # every full block
    _steps(a, tokens, 9)  # it kept decoding on the source: two more blocks filled
    copied = _stage(a, b, copied)
    _steps(a, tokens, 2)
    state, handle = a.export("r", copied)
    assert handle.first_block == copied and handle.num_blocks < 3  # only the tail moves now
    b.admit(state, handle)
    while "r" not in _steps(b, tokens, 1):
        pass
    assert a.release_export("r")
    _steps(b, tokens)
    assert tokens == hf_greedy(tiny_llama_dir, [PROMPT], MAX_TOKENS)[0]
    assert _all_free(prefill, a, b)


def test_a_stage_keeps_its_blocks_after_the_request_ends_on_the_source(trio):
    prefill, a, b, _ = trio
    tokens = _start(prefill, a)
    handle = a.precopy("r", 0)
    _steps(a, tokens)  # the request finishes on the source, its blocks go back ...
    assert a.engine.num_free_blocks == BLOCKS - handle.num_blocks  # ... except the stage's
    b.receive_stage("r", handle).result(timeout=30)  # still copyable
    assert a.release_stage("r") and b.abort("r")  # the migration is cancelled
    assert _all_free(prefill, a, b)


def test_fewer_full_blocks_than_the_minimum_publish_nothing(trio):
    prefill, a, _, _ = trio
    _start(prefill, a)
    assert a.precopy("r", 0, min_blocks=BLOCKS) is None
    assert a.stats()["migrating_out"] == 0 and a.engine.num_free_blocks > 0
    with pytest.raises(ValueError, match="is not running here"):
        a.precopy("nope", 0)


def test_an_abort_during_a_stage_frees_both_sides_once_the_copy_stops(trio):
    prefill, a, b, transport = trio
    _start(prefill, a)
    transport.hold = True
    copying = b.receive_stage("r", a.precopy("r", 0))
    assert transport.waiting.wait(30)
    assert b.abort("r") and a.abort("r")  # the request is aborted mid-stage
    assert b.engine.num_free_blocks < BLOCKS  # the copy still writes into them: kept
    b.reclaim_expired()
    assert b.engine.num_free_blocks < BLOCKS
    transport.go.set()
    assert "released before the fetch" in str(copying.exception(timeout=30))  # the source let go
    b.reclaim_expired()
    assert _all_free(prefill, a, b)


def test_a_final_stage_must_follow_the_stages_on_the_destination(trio):
    prefill, a, b, _ = trio
    tokens = _start(prefill, a)
    copied = _stage(a, b, 0)
    assert copied > 2
    _steps(a, tokens, 1)
    state, handle = a.export("r", copied - 1)
    with pytest.raises(ValueError, match="does not follow"):
        b.admit(state, handle)  # refused: nothing changed on either side
    assert a.resume_export("r")
    with pytest.raises(ValueError, match="does not follow"):
        b.receive_stage("r", a.precopy("r", 1))  # overlaps the blocks copied already
    a.release_stage("r")
    assert b.abort("r") and a.abort("r")
    assert _all_free(prefill, a, b)


def test_a_reservation_nobody_finishes_is_freed_after_the_hold_timeout(trio):
    prefill, a, b, _ = trio
    _start(prefill, a)
    b.stages_in.hold_timeout_s = 0.2
    _stage(a, b, 0)
    assert b.engine.num_free_blocks < BLOCKS
    deadline = time.monotonic() + 10
    while not b.reclaim_expired():
        assert time.monotonic() < deadline, "the abandoned reservation was never freed"
        time.sleep(0.05)
    assert b.engine.num_free_blocks == BLOCKS and b.stats()["migrating_in"] == 0
    a.abort("r")
    assert _all_free(prefill, a, b)


def test_a_final_stage_whose_reservation_was_dropped_fails_alone(trio, tiny_llama_dir):
    prefill, a, b, _ = trio
    tokens = _start(prefill, a)
    copied = _stage(a, b, 0)
    state, handle = a.export("r", copied)
    b.admit(state, handle)
    b.abort("r")  # dropped between the admission and its pull
    report = b.step()
    assert report.admitted == [] and b.engine.num_free_blocks == BLOCKS
    assert a.resume_export("r")
    _steps(a, tokens)
    assert tokens == hf_greedy(tiny_llama_dir, [PROMPT], MAX_TOKENS)[0]
    assert _all_free(prefill, a, b)


def test_a_late_release_of_an_earlier_stage_leaves_the_next_one_alone(trio):
    prefill, a, b, _ = trio
    tokens = _start(prefill, a)
    first = a.precopy("r", 0)
    b.receive_stage("r", first).result(timeout=30)
    _steps(a, tokens, 9)
    second = a.precopy("r", first.num_blocks)  # replaces the first stage
    assert not a.release_stage("r", 0)  # the first stage's release, arriving late
    b.receive_stage("r", second).result(timeout=30)
    assert a.release_stage("r", second.first_block)
    assert b.abort("r") and a.abort("r")
    assert _all_free(prefill, a, b)
