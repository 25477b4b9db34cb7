"""Moving a request without its KV: ``withdraw`` takes a waiting request (new, or preempted) out of
one engine, ``recompute`` queues a request's state in another, whose prefill rebuilds the KV of
prompt and output so far. Greedy outputs match transformers (fp32, token-exact), seeded sampling
matches a run that never moved; refusals name the problem; every block ends free."""
from __future__ import annotations

import pytest

from tandem.decode.instance import DecodeInstance
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.params import SamplingParams
from tandem.transfer.local import LocalTransport
from tests.reference import hf_greedy
from tests.unit.test_handover import PROMPTS, PublicOnly

MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_k=20, seed=7, ignore_eos=True)


def _engine(model_dir, num_blocks: int = 32) -> Engine:
    return Engine(model_dir, EngineConfig(dtype="float32", num_blocks=num_blocks, block_size=4))


def _run(engine: Engine, tokens: dict[str, list[int]]) -> None:
    while engine.has_unfinished():
        for delta in engine.step():
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir) -> dict[str, list[int]]:
    return dict(zip(PROMPTS, hf_greedy(tiny_llama_dir, list(PROMPTS.values()), MAX_TOKENS)))


def test_a_running_request_recomputed_elsewhere_matches_transformers(tiny_llama_dir, reference):
    """Migration by recompute: the source exports (keeps its blocks until the hand-over is
    settled), the destination prefills prompt + output so far and decodes on."""
    source, dest = _engine(tiny_llama_dir), _engine(tiny_llama_dir)
    tokens: dict[str, list[int]] = {}
    for rid, prompt in PROMPTS.items():
        source.add_request(prompt, GREEDY, rid)
    for _ in range(5):
        for delta in source.step():
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
    state = source.export("a").state
    assert len(state.token_ids) - state.num_prompt_tokens == len(tokens["a"]) == 5
    dest.recompute(state)
    source.release("a")
    _run(source, tokens)
    _run(dest, tokens)
    assert tokens == reference
    assert source.num_free_blocks == dest.num_free_blocks == 32


def test_seeded_sampling_continues_the_same_stream_after_a_recompute(tiny_llama_dir):
    undisturbed = _engine(tiny_llama_dir)
    undisturbed.add_request(PROMPTS["c"], SEEDED, "s")
    expected: dict[str, list[int]] = {}
    _run(undisturbed, expected)
    source, dest = _engine(tiny_llama_dir), _engine(tiny_llama_dir)
    source.add_request(PROMPTS["c"], SEEDED, "s")
    tokens: dict[str, list[int]] = {}
    for _ in range(4):
        for delta in source.step():
            tokens.setdefault("s", []).extend(delta.token_ids)
    dest.recompute(source.export("s").state)
    source.release("s")
    _run(dest, tokens)
    assert tokens == expected


def test_a_waiting_request_is_withdrawn_and_served_elsewhere(tiny_llama_dir, reference):
    source, dest = _engine(tiny_llama_dir), _engine(tiny_llama_dir)
    source.add_request(PROMPTS["b"], GREEDY, "b")  # queued: no step has run
    state = source.withdraw("b")
    assert state.token_ids == PROMPTS["b"] and not source.has_unfinished()
    dest.recompute(state)
    tokens: dict[str, list[int]] = {}
    _run(dest, tokens)
    assert tokens == {"b": reference["b"]}
    assert source.num_free_blocks == dest.num_free_blocks == 32


def test_a_preempted_request_is_withdrawn_with_its_output_and_recomputed_elsewhere(tiny_llama_dir, reference):
    """Too few blocks for three growing requests: the newest is preempted (back to waiting with
    its output); withdrawn then, it finishes on another engine as if nothing happened."""
    source, dest = _engine(tiny_llama_dir, num_blocks=12), _engine(tiny_llama_dir)
    tokens: dict[str, list[int]] = {}
    for rid, prompt in PROMPTS.items():
        source.add_request(prompt, GREEDY, rid)
    state = None
    for _ in range(40):
        for delta in source.step():
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
        if source.num_preemptions:
            state = _withdraw_any(source)
            break
    assert state is not None, "nothing was preempted (or it was recomputed at once)"
    assert len(state.token_ids) > state.num_prompt_tokens  # it had produced tokens before
    assert state.token_ids[state.num_prompt_tokens:] == tokens[state.request_id]
    dest.recompute(state)
    _run(source, tokens)
    _run(dest, tokens)
    assert tokens == reference
    assert source.num_free_blocks == 12 and dest.num_free_blocks == 32


def _withdraw_any(engine: Engine):
    """Withdraw the first request that waits (the preempted one); running ones refuse."""
    for rid in engine.request_ids():
        try:
            return engine.withdraw(rid)
        except ValueError as exc:
            assert "not waiting here" in str(exc)
    return None


def test_refusals_name_the_problem_and_change_nothing(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, num_blocks=5)
    engine.add_request(PROMPTS["b"], GREEDY, "b")
    engine.step()  # b runs now
    with pytest.raises(ValueError, match="'b' is not waiting here"):
        engine.withdraw("b")
    with pytest.raises(ValueError, match="'ghost' is not waiting here"):
        engine.withdraw("ghost")
    donor = _engine(tiny_llama_dir)
    donor.add_request(PROMPTS["b"], GREEDY, "b")
    with pytest.raises(ValueError, match="already in use"):
        engine.recompute(donor.withdraw("b"))
    donor.add_request(PROMPTS["c"] * 2, GREEDY, "long")  # 34 + 12 tokens: more than 5 blocks of 4 hold
    with pytest.raises(ValueError, match="long"):
        engine.recompute(donor.withdraw("long"))
    assert engine.request_ids() == ["b"]
    engine.abort("b")
    assert engine.num_free_blocks == 5


def test_decode_instances_redispatch_a_queued_request_and_resume_a_failed_hand_over(tiny_llama_dir, reference):
    """The instance endpoints: ``withdraw`` holds the request's state (nothing runs) until
    ``release_export`` (it went elsewhere) or ``resume_export`` (back in the queue here);
    ``recompute`` queues it, and the next step report lists it as admitted (the router commits
    the move then)."""
    def instance():
        return DecodeInstance(PublicOnly(_engine(tiny_llama_dir)), {"local": LocalTransport()})

    source, dest = instance(), instance()
    for rid in ("b", "c"):
        source.submit(rid, PROMPTS[rid], GREEDY)
    moved = source.withdraw("b")
    source.withdraw("c")
    assert not source.has_work() and source.stats()["migrating_out"] == 2
    dest.recompute(moved)
    source.release_export("b")
    source.resume_export("c")  # its hand-over failed: it runs here after all
    reports = [dest.step()]
    assert reports[0].admitted == ["b"]
    for inst in (dest, source):
        while not inst.idle():
            reports.append(inst.step())
    tokens: dict[str, list[int]] = {}
    for delta in (d for report in reports for d in report.deltas):
        tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
    assert tokens == {"b": reference["b"], "c": reference["c"]}
    for inst in (source, dest):
        assert inst.engine.num_free_blocks == 32 and inst.stats()["migrating_out"] == 0


def test_the_detokenizer_replayed_from_tokens_alone_matches_the_engines(tiny_llama_dir):
    """What a request rebuilt from the router's record continues from: at every step the replayed
    offsets equal the engine's own (a byte-level tokenizer on random weights splits characters)."""
    from tandem.engine.tokenizer import Tokenizer, replay_detokenizer

    tokenizer = Tokenizer.from_model_dir(tiny_llama_dir)
    engine = _engine(tiny_llama_dir)
    engine.add_request(PROMPTS["c"], SamplingParams(max_tokens=30, temperature=1.0, seed=3, ignore_eos=True), "t")
    for _ in range(29):
        engine.step()
        state = engine.export("t").state
        replayed = replay_detokenizer(tokenizer, state.token_ids, state.num_prompt_tokens)
        assert (replayed.prefix_offset, replayed.read_offset) == (state.prefix_offset, state.read_offset)
        engine.resume("t")


def test_a_lost_request_rebuilt_from_the_routers_record_goes_on_as_transformers_does(tiny_llama_dir, reference):
    """``router.recompute_lost``: the record's prompt, tokens and text are enough for a greedy
    request; a seeded one is refused (its sampling stream went with the instance)."""
    from tandem.cluster.recovery import Unrecoverable, lost_state
    from tandem.cluster.requests import RequestRecord
    from tandem.engine.tokenizer import Tokenizer

    lost = _engine(tiny_llama_dir)
    lost.add_request(PROMPTS["a"], GREEDY, "a")
    rec = RequestRecord("a", PROMPTS["a"], GREEDY)
    for _ in range(6):
        for delta in lost.step():
            rec.add_delta(delta, 0.0)
    survivor = _engine(tiny_llama_dir)
    survivor.recompute(lost_state(rec, Tokenizer.from_model_dir(tiny_llama_dir)))
    tokens = {"a": list(rec.token_ids)}
    _run(survivor, tokens)
    assert tokens == {"a": reference["a"]}
    with pytest.raises(Unrecoverable, match="seeded sampling stream"):
        lost_state(RequestRecord("s", PROMPTS["a"], SEEDED), None)
