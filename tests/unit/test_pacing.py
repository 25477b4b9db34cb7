"""Paced engine steps (engine/pacing.py): a step lasts at least its pace, outputs do not change."""
from __future__ import annotations

import time

import pytest

from tandem.engine import LLM, SamplingParams
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.pacing import PacedRunner, StepPace
from tandem.engine.scheduler import StepPlan


class _Seq:
    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens


PACE = StepPace(prefill=(0.01, 1e-4, 1e-6), decode=(0.02, 1e-3, 1e-5))


def test_pace_follows_the_calibration_forms() -> None:
    prefill = StepPlan("prefill", (_Seq(100), _Seq(50)))
    decode = StepPlan("decode", (_Seq(100), _Seq(50), _Seq(10)))
    assert PACE.seconds(prefill) == pytest.approx(0.01 + 1e-4 * 150 + 1e-6 * (100**2 + 50**2))
    assert PACE.seconds(decode) == pytest.approx(0.02 + 1e-3 * 3 + 1e-5 * 160)


def test_bad_pace_names_the_phase() -> None:
    with pytest.raises(ValueError, match="decode needs three coefficients >= 0"):
        StepPace(prefill=(0.0, 0.0, 0.0), decode=(0.01, -1.0, 0.0))
    with pytest.raises(ValueError, match="prefill"):
        StepPace(prefill=(0.01, 0.0), decode=(0.0, 0.0, 0.0))


class _Clock:
    """Stands in for the time module: steps advance it, sleeps are recorded (no real waiting)."""

    def __init__(self) -> None:
        self.now, self.sleeps = 100.0, []

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_a_fast_step_is_held_to_its_pace_and_a_slow_one_is_not_slowed(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr("tandem.engine.pacing.time", clock)

    class Inner:
        def __init__(self, seconds: float) -> None:
            self.seconds = seconds

        def run(self, plan):
            clock.now += self.seconds  # the model's own work
            return "logits"

    plan = StepPlan("decode", (_Seq(10),))  # paced at 21.1 ms
    fast, slow = PacedRunner(Inner(0.005), PACE), PacedRunner(Inner(0.05), PACE)
    assert fast.run(plan) == "logits"
    assert clock.sleeps == [pytest.approx(PACE.seconds(plan) - 0.005)]
    slow.run(plan)
    assert len(clock.sleeps) == 1  # 50 ms of work already outlasted the pace


def test_a_paced_engine_gives_the_same_tokens(tiny_llama_dir) -> None:
    prompts = [[5, 6, 7, 8] * 3, [9, 10, 11]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    plain = LLM(tiny_llama_dir, dtype="float32", num_blocks=32).generate(prompts, params)
    paced_llm = LLM(tiny_llama_dir, dtype="float32", num_blocks=32)
    pace = StepPace(prefill=(0.005, 0.0, 0.0), decode=(0.005, 0.0, 0.0))
    paced_llm.engine = Engine(tiny_llama_dir, EngineConfig(dtype="float32", num_blocks=32, step_pace=pace))
    assert isinstance(paced_llm.engine._step_runner, PacedRunner)
    start = time.perf_counter()
    paced = paced_llm.generate(prompts, params)
    assert [c.token_ids for c in paced] == [c.token_ids for c in plain]
    assert time.perf_counter() - start >= 6 * 0.005  # one prefill and five decode steps
    assert paced_llm.engine.blocks.num_free == 32


def test_a_mixed_step_pays_both_variable_parts_under_the_larger_intercept() -> None:
    pace = StepPace(prefill=(0.01, 1e-4, 1e-6), decode=(0.02, 1e-3, 1e-5))
    # two decodes at contexts 10 and 20, a chunk of 30 tokens after 50 cached, a whole 8-token prompt
    plan = StepPlan("mixed", (), (), ((9, 1), (19, 1), (50, 30), (0, 8)))
    want = 0.02 + 2 * 1e-3 + 30 * 1e-5 + 1e-4 * 38 + 1e-6 * (30 * 130 + 64)
    assert pace.seconds(plan) == pytest.approx(want)
    # a mixed step of whole prompts alone is the prefill form
    assert pace.seconds(StepPlan("mixed", (), (), ((0, 8),))) == pytest.approx(0.01 + 8e-4 + 64e-6)
