"""Decode instances as migration source and destination, without Ray: a request exported from one
mid-stream and admitted by the other (or resumed at the source) gives transformers' tokens, and
every block comes back on both sides."""
from __future__ import annotations

import pytest

from tandem.decode.instance import DecodeInstance
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.params import SamplingParams
from tandem.engine.scheduler import SchedulerConfig
from tandem.prefill.instance import PrefillInstance
from tandem.transfer.local import LocalTransport
from tests.reference import hf_greedy

MAX_TOKENS = 24
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
PROMPT = [5, 17, 42, 9, 33, 7, 81, 12, 60]
BLOCKS = 32


def _engine(model_dir, decode: bool) -> Engine:
    return Engine(model_dir, EngineConfig(dtype="float32", num_blocks=BLOCKS, block_size=4,
                                          scheduler=SchedulerConfig(enable_decode=decode)))


@pytest.fixture
def trio(tiny_llama_dir):
    transport = LocalTransport()
    prefill = PrefillInstance(_engine(tiny_llama_dir, False), transport)
    a, b = (DecodeInstance(_engine(tiny_llama_dir, True), {"local": transport}) for _ in range(2))
    yield prefill, a, b
    a.close()
    b.close()


def _steps(inst: DecodeInstance, tokens: list[int], count: int | None = None) -> list[str]:
    """Step ``count`` times (or until idle); collect tokens; the ids admitted meanwhile."""
    admitted, n = [], 0
    while (count is None and not inst.idle()) or (count is not None and n < count):
        report = inst.step()
        assert not report.failed, report.failed
        admitted += report.admitted
        tokens += [t for d in report.deltas for t in d.token_ids]
        n += 1
    return admitted


def _start(prefill, a, steps: int = 5) -> list[int]:
    """Prefill the request, admit it on ``a`` and decode ``steps`` steps there; its tokens."""
    prefill.submit("r", PROMPT, GREEDY)
    (result,) = prefill.step()
    a.admit(result.state, result.handle)
    tokens = list(result.delta.token_ids)
    while "r" not in _steps(a, tokens, 1):
        pass
    prefill.ack("r")
    _steps(a, tokens, steps)
    return tokens


@pytest.mark.parametrize("back_again", [False, True])
def test_a_request_moved_mid_stream_gives_the_same_tokens(trio, tiny_llama_dir, back_again):
    prefill, a, b = trio
    tokens = _start(prefill, a)
    route = [(a, b), (b, a)] if back_again else [(a, b)]
    for source, dest in route:
        state, handle = source.export("r")
        assert len(state.token_ids) - state.num_prompt_tokens == len(tokens)  # all streamed so far
        assert source.stats()["migrating_out"] == 1 and not source.has_work()
        dest.admit(state, handle)
        while "r" not in _steps(dest, tokens, 1):
            pass
        assert source.release_export("r")  # committed: the source frees it
        _steps(dest, tokens, 3)
    _steps(route[-1][1], tokens)
    assert tokens == hf_greedy(tiny_llama_dir, [PROMPT], MAX_TOKENS)[0]
    for inst in (prefill, a, b):
        assert inst.engine.num_free_blocks == BLOCKS and inst.engine.stats()["held"] == 0


def test_a_migration_that_fails_resumes_at_the_source(trio, tiny_llama_dir):
    prefill, a, _ = trio
    tokens = _start(prefill, a)
    a.export("r")
    assert a.resume_export("r")  # the destination never took it
    _steps(a, tokens)
    assert tokens == hf_greedy(tiny_llama_dir, [PROMPT], MAX_TOKENS)[0]
    assert a.engine.num_free_blocks == BLOCKS and a.stats()["migrating_out"] == 0


def test_only_a_running_request_can_leave(trio):
    prefill, a, _ = trio
    _start(prefill, a)
    with pytest.raises(ValueError, match="is not running here"):
        a.export("nope")
    a.export("r")
    with pytest.raises(ValueError, match="is not running here"):
        a.export("r")  # already on its way
    assert a.abort("r") and a.engine.num_free_blocks == BLOCKS  # an abort reaches the held export


def test_an_export_nobody_settles_goes_on_at_the_source_after_the_hold_timeout(trio, tiny_llama_dir):
    import time

    prefill, a, _ = trio
    tokens = _start(prefill, a)
    a.outgoing.hold_timeout_s = 0.1
    a.export("r")  # the router never heard back (a lost reply) and never settles it
    deadline = time.monotonic() + 10
    while a.reclaim_expired() != ["r"]:
        assert time.monotonic() < deadline, "the held export was never reclaimed"
        time.sleep(0.02)
    _steps(a, tokens)
    assert tokens == hf_greedy(tiny_llama_dir, [PROMPT], MAX_TOKENS)[0]
    assert a.engine.num_free_blocks == BLOCKS and a.stats()["migrating_out"] == 0
