"""Prefill -> decode in one process over the shm transport (two 'instances', two shared-memory
pools): outputs match the plain engine, and failed or late transfers free blocks on both sides."""
from __future__ import annotations

import time

import pytest

from tandem.decode.instance import DecodeInstance
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.params import SamplingParams
from tandem.engine.scheduler import SchedulerConfig
from tandem.prefill.instance import PrefillInstance
from tandem.transfer.shm import ShmTransport

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPT = [5, 17, 42, 9, 33, 7, 81, 12, 60, 3, 14, 15, 92, 65, 35, 89, 79, 32, 38]  # 19: 5 blocks


@pytest.fixture
def pair(tiny_llama_dir):
    """(prefill instance, decode instance), each engine's cache in its transport's pool."""
    made = []

    def instance(kind: str, hold_timeout_s: float = 60.0, **chunking):
        transport = ShmTransport()
        made.append(transport)
        scheduler = SchedulerConfig(enable_decode=kind == "decode", **chunking)
        engine = Engine(tiny_llama_dir, EngineConfig(dtype="float32", num_blocks=12, block_size=4,
                                                     scheduler=scheduler),
                        kv_allocator=transport.allocate)
        if kind == "prefill":
            return PrefillInstance(engine, transport, hold_timeout_s)
        return DecodeInstance(engine, {"shm": transport}, timeout_s=5)

    yield instance
    for transport in made:
        transport.close()


def _prefill(prefill: PrefillInstance, rid: str):
    prefill.submit(rid, PROMPT, GREEDY)
    (result,) = prefill.step()
    assert result.handle is not None and result.handle.num_blocks == 5
    return result


def _decode_all(decode: DecodeInstance, rid: str) -> list[int]:
    tokens = []
    while not decode.idle():  # KV pulls land on their own thread: step until they have too
        report = decode.step()
        assert not report.failed, report.failed
        tokens += [t for d in report.deltas if d.request_id == rid for t in d.token_ids]
    return tokens


def _unchunked_engine_tokens(model_dir) -> list[int]:
    plain = Engine(model_dir, EngineConfig(dtype="float32", num_blocks=12, block_size=4))
    plain.add_request(PROMPT, GREEDY, "r1")
    tokens = []
    while plain.has_unfinished():
        tokens += [t for d in plain.step() for t in d.token_ids]
    return tokens


def test_disaggregated_over_shm_matches_the_engine(pair, tiny_llama_dir):
    prefill, decode = pair("prefill"), pair("decode")
    result = _prefill(prefill, "r1")
    decode.admit(result.state, result.handle)
    tokens = result.delta.token_ids + _decode_all(decode, "r1")
    prefill.ack("r1")
    expected = _unchunked_engine_tokens(tiny_llama_dir)
    assert tokens == expected and len(tokens) == 8
    for inst in (prefill, decode):
        assert inst.engine.num_free_blocks == 12


def test_a_chunked_prefill_instance_hands_over_only_whole_prompts(pair, tiny_llama_dir):
    """Chunks of 6 (the 19-token prompt takes four steps): nothing is published before the last
    chunk, and the decode side continues from the same KV as an unchunked prefill would leave."""
    prefill = pair("prefill", chunked_prefill=True, max_num_batched_tokens=6, max_num_seqs=4)
    decode = pair("decode")
    prefill.submit("r1", PROMPT, GREEDY)
    assert [prefill.step() for _ in range(3)] == [[], [], []]
    (result,) = prefill.step()
    assert result.handle is not None and result.handle.num_blocks == 5
    decode.admit(result.state, result.handle)
    tokens = result.delta.token_ids + _decode_all(decode, "r1")
    prefill.ack("r1")
    expected = _unchunked_engine_tokens(tiny_llama_dir)
    assert tokens == expected
    for inst in (prefill, decode):
        assert inst.engine.num_free_blocks == 12


def test_a_fetch_after_the_source_let_go_fails_and_frees_the_reservation(pair):
    prefill, decode = pair("prefill", hold_timeout_s=0.0), pair("decode")
    result = _prefill(prefill, "r1")
    assert prefill.engine.num_free_blocks == 7  # held for the decode side
    time.sleep(0.01)
    assert prefill.reclaim_expired() == ["r1"]  # nobody acked in time: blocks back to the pool
    assert prefill.engine.num_free_blocks == 12
    _prefill(prefill, "r2")  # reuses the freed blocks with another request's KV
    decode.admit(result.state, result.handle)
    report = decode.step()
    while not report.failed:  # the pull fails on the transfer thread; a later step reports it
        assert not decode.idle() and not report.admitted
        report = decode.step()
    assert report.admitted == [] and report.failed[0][0] == "r1"
    assert "released before the fetch" in report.failed[0][1]
    assert decode.engine.num_free_blocks == 12 and decode.idle()
