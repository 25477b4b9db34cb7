"""Admissions pull their KV beside the decode steps: while one pull is held, the running requests
keep getting a token every step, and the held request joins once its pull lands. Tokens are
checked against transformers (greedy, fp32)."""
from __future__ import annotations

import threading

from tandem.decode.instance import DecodeInstance
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.params import SamplingParams
from tandem.engine.scheduler import SchedulerConfig
from tandem.prefill.instance import PrefillInstance
from tandem.transfer.local import LocalTransport
from tests.reference import hf_greedy

MAX_TOKENS = 40
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
PROMPTS = {"running": [5, 17, 42, 9, 33, 7], "held": [8, 21, 4, 77, 3, 5, 60, 61]}


class HeldTransport(LocalTransport):
    """Pulls of ``held_id`` wait (on the transfer thread) until the test releases them."""

    @staticmethod
    def never_waits(handle) -> bool:
        return False  # it does wait: its pulls must run on the transfer thread

    def __init__(self, held_id: str) -> None:
        super().__init__()
        self.held_id = held_id
        self.release_pull = threading.Event()
        self.pull_started = threading.Event()

    def fetch(self, handle, kv_cache, block_ids, timeout_s):
        if handle.request_id == self.held_id:
            self.pull_started.set()
            assert self.release_pull.wait(30), "the test never released the pull"
        super().fetch(handle, kv_cache, block_ids, timeout_s)


def _engine(model_dir, decode: bool) -> Engine:
    return Engine(model_dir, EngineConfig(dtype="float32", num_blocks=32, block_size=4,
                                          scheduler=SchedulerConfig(enable_decode=decode)))


def test_running_requests_decode_while_a_pull_is_held(tiny_llama_dir):
    transport = HeldTransport("held")
    prefill = PrefillInstance(_engine(tiny_llama_dir, decode=False), transport)
    decode = DecodeInstance(_engine(tiny_llama_dir, decode=True), {"local": transport})
    for rid, prompt in PROMPTS.items():
        prefill.submit(rid, prompt, GREEDY)
    results = {r.delta.request_id: r for r in prefill.step()}
    tokens = {rid: list(r.delta.token_ids) for rid, r in results.items()}

    def step():
        report = decode.step()
        for delta in report.deltas:
            tokens[delta.request_id] += delta.token_ids
        return report

    decode.admit(results["running"].state, results["running"].handle)
    while "running" not in step().admitted:
        pass
    decode.admit(results["held"].state, results["held"].handle)
    assert step().admitted == []  # starts the held pull
    assert transport.pull_started.wait(30)
    before = len(tokens["running"])
    for _ in range(10):  # the held pull blocks the transfer thread, not the steps
        report = step()
        assert not report.admitted and not report.failed
    assert len(tokens["running"]) == before + 10 and len(tokens["held"]) == 1
    assert decode.stats()["pending_admissions"] == 1
    transport.release_pull.set()
    while "held" not in step().admitted:
        pass
    while not decode.idle():
        step()
    expected = hf_greedy(tiny_llama_dir, list(PROMPTS.values()), MAX_TOKENS)
    assert [tokens[rid] for rid in PROMPTS] == expected
    prefill.ack("running")
    prefill.ack("held")
    assert decode.engine.num_free_blocks == prefill.engine.num_free_blocks == 32
    decode.close()


def test_a_small_admission_over_local_memory_joins_the_step_it_arrives_for(tiny_llama_dir):
    """A transport whose fetch never waits (shared memory, here in-process) copies a few blocks on
    the step thread: the request is admitted and gets its next token in the same step. A larger
    one is pulled beside the steps and joins a later step."""
    transport = LocalTransport()
    prefill = PrefillInstance(_engine(tiny_llama_dir, decode=False), transport)
    decode = DecodeInstance(_engine(tiny_llama_dir, decode=True), {"local": transport})
    prefill.submit("small", PROMPTS["running"], GREEDY)
    prefill.submit("large", list(range(3, 60)), GREEDY)  # 15 blocks of 4: more than a step copies
    results = {r.delta.request_id: r for r in prefill.step()}
    decode.admit(results["small"].state, results["small"].handle)
    decode.admit(results["large"].state, results["large"].handle)
    report = decode.step()
    assert report.admitted == ["small"] and [d.request_id for d in report.deltas] == ["small"]
    while "large" not in decode.step().admitted:
        pass
    decode.abort("small")
    decode.abort("large")
    for rid in results:
        prefill.ack(rid)
    assert decode.engine.num_free_blocks == prefill.engine.num_free_blocks == 32
    decode.close()
