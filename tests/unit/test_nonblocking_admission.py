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
