"""The engine's hand-over API: instances run on it alone, and requests moved with it decode as
transformers does (greedy fp32, token-exact); refusals name the problem and hold no blocks."""
from __future__ import annotations

import pytest

from tandem.decode.instance import DecodeInstance
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.handover import HandoverEngine
from tandem.engine.params import SamplingParams
from tandem.engine.scheduler import SchedulerConfig
from tandem.prefill.instance import PrefillInstance
from tandem.transfer.local import LocalTransport
from tests.reference import hf_greedy

MAX_TOKENS = 10
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
PROMPTS = {"a": [5, 17, 42, 9, 33, 7, 81, 12, 60, 3, 14, 15, 92], "b": [8, 21, 4, 77, 3, 5],
           "c": [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56]}
NUM_BLOCKS = 16
PUBLIC = {n for n in dir(HandoverEngine) if not n.startswith("_")} | set(HandoverEngine.__annotations__)


class PublicOnly:
    """An Engine seen through the hand-over protocol only: any other attribute is an error."""

    def __init__(self, engine: Engine) -> None:
        object.__setattr__(self, "_engine", engine)

    def __getattr__(self, name: str):
        if name not in PUBLIC:
            raise AttributeError(f"{name!r} is not part of the engine's public step/hand-over API")
        return getattr(object.__getattribute__(self, "_engine"), name)


def _engine(model_dir, *, decode: bool, num_blocks: int = NUM_BLOCKS) -> Engine:
    scheduler = SchedulerConfig(enable_decode=decode)
    return Engine(model_dir, EngineConfig(dtype="float32", num_blocks=num_blocks, block_size=4,
                                          scheduler=scheduler))


@pytest.fixture(scope="module")
def reference(tiny_llama_dir) -> dict[str, list[int]]:
    outs = hf_greedy(tiny_llama_dir, list(PROMPTS.values()), MAX_TOKENS)
    return dict(zip(PROMPTS, outs))


def test_the_proxy_hides_the_engine_internals(tiny_llama_dir):
    proxy = PublicOnly(_engine(tiny_llama_dir, decode=True))
    for internal in ("scheduler", "blocks", "runner", "_step_runner"):
        with pytest.raises(AttributeError, match="not part of the engine's public"):
            getattr(proxy, internal)
    assert {"export", "reserve", "admit", "release", "resume", "kv_cache", "step"} <= PUBLIC


def test_instances_on_the_public_api_alone_match_transformers(tiny_llama_dir, reference):
    transport = LocalTransport()
    prefill = PrefillInstance(PublicOnly(_engine(tiny_llama_dir, decode=False)), transport)
    decode = DecodeInstance(PublicOnly(_engine(tiny_llama_dir, decode=True)), {"local": transport})
    for rid, prompt in PROMPTS.items():
        prefill.submit(rid, prompt, GREEDY)
    tokens: dict[str, list[int]] = {rid: [] for rid in PROMPTS}
    while prefill.has_work():
        for result in prefill.step():
            tokens[result.delta.request_id] += result.delta.token_ids
            decode.admit(result.state, result.handle)
    while not decode.idle():
        report = decode.step()
        assert not report.failed, report.failed
        for rid in report.admitted:
            prefill.ack(rid)
        for delta in report.deltas:
            tokens[delta.request_id] += delta.token_ids
    assert tokens == reference
    for inst in (prefill, decode):
        stats = inst.engine.stats()
        assert stats["free_blocks"] == NUM_BLOCKS and stats["held"] == 0


def _decode(engine: Engine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            out.setdefault(delta.request_id, []).extend(delta.token_ids)
    return out


def test_a_running_request_moves_between_decode_engines_mid_stream(tiny_llama_dir, reference):
    """decode -> decode, as live migration will: export after some steps, copy, admit, go on."""
    source, dest = _engine(tiny_llama_dir, decode=True), _engine(tiny_llama_dir, decode=True)
    transport = LocalTransport()
    tokens = {rid: [] for rid in PROMPTS}
    for rid, prompt in PROMPTS.items():
        source.add_request(prompt, GREEDY, rid)
    for _ in range(4):  # one prefill step, then three decode steps
        for delta in source.step():
            tokens[delta.request_id] += delta.token_ids
    export = source.export("a")
    handle = transport.export(source.kv_cache, "a", export.block_ids, export.num_kv_tokens)
    table = dest.reserve("a", export.num_kv_tokens)
    transport.fetch(handle, dest.kv_cache, table, timeout_s=5)
    dest.admit(export.state)
    source.release("a")
    for engine in (source, dest):
        for rid, new in _decode(engine).items():
            tokens[rid] += new
    assert tokens == reference
    assert source.num_free_blocks == NUM_BLOCKS and dest.num_free_blocks == NUM_BLOCKS


def test_a_resumed_export_decodes_on_as_if_never_exported(tiny_llama_dir, reference):
    engine = _engine(tiny_llama_dir, decode=True)
    engine.add_request(PROMPTS["b"], GREEDY, "b")
    first = engine.step()  # the prefill: b is running now
    engine.export("b")
    assert engine.step() == [] and engine.stats()["held"] == 1  # exported: not scheduled
    engine.resume("b")
    assert first[0].token_ids + _decode(engine)["b"] == reference["b"]
    assert engine.num_free_blocks == NUM_BLOCKS and engine.stats()["held"] == 0


def test_refusals_name_the_problem_and_hold_nothing(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, decode=True, num_blocks=4)
    engine.add_request(PROMPTS["b"], GREEDY, "queued")
    with pytest.raises(ValueError, match="'queued' is not running here"):
        engine.export("queued")  # still waiting for its prefill
    with pytest.raises(ValueError, match="'ghost' is not exported"):
        engine.resume("ghost")
    assert engine.reserve("big", 4 * 4 + 1) is None  # 17 tokens need 5 of 4 blocks
    state = _one_state(tiny_llama_dir)
    with pytest.raises(ValueError, match="has no reservation here"):
        engine.admit(state)
    assert engine.reserve(state.request_id, 4) is not None  # one block for 4 tokens
    with pytest.raises(ValueError, match="brings 6 tokens of KV for 4 reserved slots"):
        engine.admit(state)
    with pytest.raises(ValueError, match="already in use"):
        engine.reserve(state.request_id, 4)
    engine.release(state.request_id)
    engine.release(state.request_id)  # twice: a no-op
    engine.abort("queued")
    assert engine.num_free_blocks == 4 and engine.stats()["held"] == 0


def _one_state(model_dir):
    """The state of a prefilled 6-token prompt (7 tokens, 6 of them with KV)."""
    engine = _engine(model_dir, decode=False)
    engine.add_request(PROMPTS["b"], GREEDY, "moving")
    engine.step()
    return engine.export("moving").state


def test_abort_all_frees_every_block_wherever_requests_are(tiny_llama_dir):
    """What a restarted router asks of every instance: queued, held, pending and running requests
    all dropped, every block free, and the instance serves a new request as transformers does."""
    transport = LocalTransport()
    prefill = PrefillInstance(PublicOnly(_engine(tiny_llama_dir, decode=False)), transport)
    decode = DecodeInstance(PublicOnly(_engine(tiny_llama_dir, decode=True)), {"local": transport})
    for rid in ("a", "b"):
        prefill.submit(rid, PROMPTS[rid], GREEDY)
    results = prefill.step()  # both prefilled: their KV is held for the decode side
    prefill.submit("c", PROMPTS["c"], GREEDY)  # queued
    decode.admit(results[0].state, results[0].handle)
    _step_until_admitted(decode, "a")  # "a" runs on the decode side
    decode.admit(results[1].state, results[1].handle)
    decode.step()  # "b"'s KV is being pulled (or has landed, not yet admitted)
    assert (prefill.abort_all(), decode.abort_all()) == (3, 2)
    while not decode.idle():  # a pull aborted in flight gives its blocks back once it lands
        assert not decode.step().admitted
    for inst in (prefill, decode):
        stats = inst.engine.stats()
        assert (stats["free_blocks"], stats["held"], stats["waiting"], stats["running"]) == (NUM_BLOCKS, 0, 0, 0)
    assert not prefill.held and decode.idle()
    prefill.submit("c", PROMPTS["c"], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    assert prefill.step()[0].delta.token_ids == reference_first(tiny_llama_dir, PROMPTS["c"])


def reference_first(model_dir, prompt: list[int]) -> list[int]:
    return hf_greedy(model_dir, [prompt], 1)[0]


def _step_until_admitted(decode: DecodeInstance, rid: str, limit: int = 10_000) -> None:
    for _ in range(limit):
        if rid in decode.step().admitted:
            return
    raise AssertionError(f"{rid!r} was not admitted in {limit} steps")
