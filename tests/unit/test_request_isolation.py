"""One request cannot hurt the others: strict validation at the boundary names the bad field, and
a failure inside one request's own handling fails that request alone. References: transformers
(greedy tokens) and the engine's free-block count."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.engine import LLM, SamplingParams
from tandem.engine.loop import InstanceStopped, StepLoop
from tests.reference import hf_greedy

PROMPTS = [[5, 17, 42, 99, 7], [8, 21, 4, 77, 3, 5, 6], [40, 41, 42]]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
NUM_BLOCKS = 12
FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids",
          "ignore_eos", "logprobs")


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(tiny_llama_dir, dtype="float32", block_size=16, num_blocks=NUM_BLOCKS, max_model_len=64)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path) -> list[list[int]]:
    return hf_greedy(tiny_llama_dir, PROMPTS, GREEDY.max_tokens)


def assert_idle(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats["free_blocks"] == NUM_BLOCKS and stats["held"] == 0 and not llm.engine.has_unfinished()


@pytest.mark.parametrize("kwargs, named", [
    ({"max_tokens": True}, "max_tokens: expected `int`, got `bool`"),
    ({"max_tokens": 2**64}, "max_tokens"),
    ({"temperature": "hot"}, "temperature: expected `float`, got `str`"),
    ({"temperature": float("inf")}, "temperature: must be finite"),
    ({"top_k": 2**64}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"stop": 5}, "stop: expected `array`, got `int`"),
    ({"stop": ["ok", 3]}, r"stop\[1\]"),
    ({"stop_token_ids": "12"}, "stop_token_ids: expected `array`, got `str`"),
    ({"stop_token_ids": [1.0]}, r"stop_token_ids\[0\]"),
    ({"stop_token_ids": [-1]}, r"stop_token_ids\[0\]"),
    ({"logprobs": "no"}, "logprobs: expected `bool`, got `str`"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"seed": "7"}, "seed"),
])
def test_coerced_values_are_refused_naming_the_field(kwargs, named):
    with pytest.raises(ValueError, match=named):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompt, named", [
    ([65.9, 66.9], r"prompt\[0\]: token ids must be integers, got float"),
    (["65", "66"], r"prompt\[0\]: token ids must be integers, got str"),
    ([True, False], r"prompt\[0\]: token ids must be integers, got bool"),
    ([5, None], r"prompt\[1\]"),
    ({"ids": [5]}, "prompt must be a string or a list of token ids, got dict"),
    (b"hello", "prompt must be a string or a list of token ids, got bytes"),
])
def test_prompts_of_the_wrong_type_are_refused(llm, prompt, named):
    with pytest.raises(TypeError, match=named):
        llm.engine.add_request(prompt, GREEDY)
    assert_idle(llm)


@pytest.mark.parametrize("params, named", [
    (SamplingParams(top_k=257), "top_k: 257 exceeds the vocabulary size 256"),
    (SamplingParams(stop_token_ids=[256]), r"stop_token_ids outside the vocabulary \[0, 256\)"),
])
def test_model_dependent_limits_are_named(llm, params, named):
    with pytest.raises(ValueError, match=named):
        llm.engine.add_request(PROMPTS[0], params)
    assert_idle(llm)


def test_params_of_the_wrong_type_are_refused(llm):
    for params in ({"max_tokens": 3}, {}, 5):
        with pytest.raises(TypeError, match="params must be SamplingParams"):
            llm.engine.add_request(PROMPTS[0], params)
    assert_idle(llm)


def test_text_past_the_size_cap_is_refused_before_tokenizing(llm, monkeypatch):
    calls = []
    monkeypatch.setattr(llm.engine.tokenizer, "encode", lambda text: calls.append(text) or [5])
    with pytest.raises(ValueError, match=r"prompt of 4097 characters cannot fit .* 64 tokens"):
        llm.engine.add_request("x" * (64 * 64 + 1), GREEDY)
    assert calls == []
    assert_idle(llm)


def test_a_temperature_near_zero_samples_greedily(llm, reference):
    tiny = SamplingParams(max_tokens=6, temperature=1e-50, ignore_eos=True)
    assert tiny.greedy and not SamplingParams(temperature=1e-5).greedy
    assert [o.token_ids for o in llm.generate(PROMPTS, tiny)] == reference
    assert_idle(llm)


def test_a_failure_in_one_requests_detokenization_fails_it_alone(llm, reference, monkeypatch):
    from tandem.engine import engine as engine_module

    real = engine_module.detokenize_step

    def detokenize_step(tokenizer, token_ids, state):
        if token_ids[:len(PROMPTS[1])] == PROMPTS[1] and len(token_ids) == len(PROMPTS[1]) + 3:
            raise RuntimeError("injected detokenizer fault")
        return real(tokenizer, token_ids, state)

    monkeypatch.setattr(engine_module, "detokenize_step", detokenize_step)
    outs = llm.generate(PROMPTS, GREEDY)
    assert outs[1].finish_reason == "error" and outs[1].token_ids == reference[1][:2]
    assert "failed handling its output token 2: RuntimeError: injected detokenizer fault" in outs[1].error
    assert [o.token_ids for o in (outs[0], outs[2])] == [reference[0], reference[2]]
    assert all(o.finish_reason == "length" for o in (outs[0], outs[2]))
    assert_idle(llm)


class _Failing:
    """An instance whose step raises once it has work."""

    def __init__(self) -> None:
        self.work = threading.Event()

    def has_work(self) -> bool:
        return self.work.is_set()

    def step(self):
        raise RuntimeError("injected step fault")


def test_a_failed_step_stops_the_loop_and_says_so_at_once():
    failures: list[BaseException] = []
    told = threading.Event()
    instance = _Failing()
    loop = StepLoop(instance, lambda _: None, idle_tick_s=0.05,
                    on_failure=lambda exc: (failures.append(exc), told.set()))
    assert loop.failure() is None
    instance.work.set()
    loop.call(lambda: None).result(timeout=5)  # wake the loop: it steps, the step raises
    assert told.wait(timeout=5)
    assert str(failures[0]) == "injected step fault"
    assert loop.failure() == "RuntimeError: injected step fault"
    with pytest.raises(InstanceStopped, match=r"stopped \(RuntimeError: injected step fault\)"):
        loop.call(lambda: None).result(timeout=5)
    loop.stop()


# --- fuzzing the request schema ----------------------------------------------------------------

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(0, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 2), st.text(max_size=4),
    st.lists(st.one_of(st.integers(-5, 300), st.text(max_size=2), st.booleans(), st.floats()), max_size=3),
)
PROMPT = st.one_of(
    st.text(max_size=30), st.lists(st.integers(-5, 300), max_size=70),
    st.lists(st.one_of(st.integers(0, 255), st.floats(), st.booleans(), st.text(max_size=2)), max_size=4),
)


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(fields=st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE, max_size=4), prompt=PROMPT)
def test_any_request_runs_or_is_refused_naming_what_is_wrong(llm, fields, prompt):
    fields = {"max_tokens": 3, **fields}  # short runs; fuzzed values may replace it
    try:
        params = SamplingParams(**fields)
        [out] = llm.generate([prompt], params)
    except (ValueError, TypeError) as exc:
        assert any(name in str(exc) for name in (*FIELDS, "prompt", "params")), str(exc)
    else:
        assert out.finish_reason in ("length", "stop") and 1 <= len(out.token_ids) <= params.max_tokens
    assert_idle(llm)
