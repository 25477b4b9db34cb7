"""Interference between the phases on one node: the simulator against queueing theory and against
hand-computed step times, and the planner applying a profile's interference only on shared nodes."""
from __future__ import annotations

import random

import msgspec
import pytest

from tandem.placement.calibrate import CalibratedProfile
from tandem.placement.candidates import Shape
from tandem.placement.evaluate import Deployment, Evaluator
from tandem.placement.plan import InstancePlacement, StagePlacement
from tandem.placement.policy import Policy
from tandem.placement.problem import problem_from_dict
from tandem.placement.sim_core import InstanceModel, Interference, Slo
from tandem.placement.sim_disagg import simulate_disaggregated
from tandem.placement.workload import BaseTrace

LOOSE = Slo(ttft_ms=1e6, tpot_ms=1e6)
PREFILL_S, DECODE_S = 0.05, 0.5
SLOWDOWN = Interference(prefill=0.3, decode=0.2)


class ConstantSteps:
    """Fixed prefill latency per batch and fixed decode step time, whatever the batch."""

    def prefill(self, seqs: int, tokens: int, sum_sq: float) -> tuple[float, float]:
        return PREFILL_S, PREFILL_S

    def decode(self, batch: int, sum_ctx: int) -> float:
        return DECODE_S

    def mixed(self, *args) -> float:  # type: ignore[no-untyped-def]
        raise AssertionError("no colocated steps here")


def _poisson(count: int, rate: float, seed: int) -> list[float]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def _run(times, inputs, outputs, shared: bool, interference=SLOWDOWN, window=None):  # type: ignore[no-untyped-def]
    policy = Policy(prefill_token_budget=64, prefill_max_batch=1, decode_max_batch=8)
    inst = InstanceModel(ConstantSteps(), kv_blocks=10**6)
    trace = BaseTrace(tuple(times), tuple(inputs), tuple(outputs))
    return simulate_disaggregated([inst], [inst], [[(0.0, 0.0)]], policy, trace, 1.0, LOOSE, window,
                                  interference=interference, shared_node=[[0]] if shared else [[]])


@pytest.mark.parametrize("load", [0.3, 0.6, 0.85])
def test_prefill_beside_a_busy_decode_queues_like_md1_with_the_slower_service(load: float) -> None:
    """Request 0 decodes for the whole run, so every later prefill (1 output token: no decode of
    its own) runs beside a busy decode instance: M/D/1 with service D * (1 + interference)."""
    service = PREFILL_S * (1 + SLOWDOWN.prefill)
    rate, count = load / service, 30_000
    times = [0.0] + [1e-3 + t for t in _poisson(count, rate, seed=1)]
    steps_needed = int(1.2 * times[-1] / DECODE_S) + 10
    inputs, outputs = [32] * (count + 1), [steps_needed] + [1] * count
    result = _run(times, inputs, outputs, shared=True, window=(count // 40, count + 1))
    expected = service + rate * service**2 / (2 * (1 - rate * service))
    assert result.ttft_pct.mean == pytest.approx(expected, rel=0.05)
    # Across nodes the same run sees the plain service time.
    apart = _run(times, inputs, outputs, shared=False, window=(count // 40, count + 1))
    plain = PREFILL_S + rate * PREFILL_S**2 / (2 * (1 - rate * PREFILL_S))
    assert apart.ttft_pct.mean == pytest.approx(plain, rel=0.05)


def test_decode_beside_a_busy_prefill_runs_slower_steps() -> None:
    """One long decode while back-to-back prefills (queued at t=0) keep the neighbour busy: its
    TPOT is the step time times (1 + interference) until the prefills run out."""
    prefills = 400  # 400 * 0.05 s = 20 s of prefill, longer than the decode below
    times = [0.0] + [1e-6] * prefills
    inputs, outputs = [32] * (prefills + 1), [21] + [1] * prefills  # 20 decode steps: 12 s at most
    shared = _run(times, inputs, outputs, shared=True, window=(0, 1))
    assert shared.tpot_pct.mean == pytest.approx(DECODE_S * (1 + SLOWDOWN.decode), rel=0.01)
    apart = _run(times, inputs, outputs, shared=False, window=(0, 1))
    assert apart.tpot_pct.mean == pytest.approx(DECODE_S, rel=1e-9)


def test_no_interference_leaves_runs_unchanged() -> None:
    times = _poisson(300, 4.0, seed=3)
    inputs, outputs = [32 + i % 50 for i in range(300)], [2 + i % 30 for i in range(300)]
    assert _run(times, inputs, outputs, shared=True, interference=None) == \
        _run(times, inputs, outputs, shared=False, interference=None)
    assert _run(times, inputs, outputs, shared=True, interference=Interference()) == \
        _run(times, inputs, outputs, shared=False)


def test_bad_shared_node_lists_are_refused() -> None:
    one = [InstanceModel(ConstantSteps(), 100)]
    trace = BaseTrace((0.0,), (8,), (2,))
    for bad in ([[1]], [[0], [0]]):  # no decode instance 1; two lists for one prefill instance
        with pytest.raises(ValueError, match="shared_node"):
            simulate_disaggregated(one, one, [[(0.0, 0.0)]], Policy(), trace, 1.0, LOOSE, shared_node=bad)


def test_profile_interference_round_trips_and_rejects_negative() -> None:
    profile = CalibratedProfile(entries=(), interference=Interference(prefill=0.1, decode=0.05))
    assert msgspec.json.decode(msgspec.json.encode(profile), type=CalibratedProfile) == profile
    with pytest.raises(msgspec.ValidationError, match="interference.prefill"):
        msgspec.json.decode(b'{"entries": [], "interference": {"prefill": -0.1}}', type=CalibratedProfile)


def _deployment(prefill_node: int, decode_node: int) -> Deployment:
    def at(node: int) -> tuple[InstancePlacement, ...]:
        return (InstancePlacement((StagePlacement(node, (0,)),)),)
    return Deployment("high-affinity", Shape(1, 1), Shape(1, 1), at(prefill_node), at(decode_node))


def test_planner_applies_interference_only_between_instances_on_one_node() -> None:
    problem = problem_from_dict({
        "model": "opt-13b", "hardware": "A100-80GB", "cluster": {"nodes": 2, "devices_per_node": 2},
        "slo": {"ttft_ms": 500, "tpot_ms": 100}, "workload": {"input_len": 512, "output_len": 64}})
    calibrated = msgspec.structs.replace(
        problem, calibration=CalibratedProfile(entries=(), interference=Interference(prefill=1.0, decode=1.0)))
    rate = 0.5 * Evaluator(problem).joint_capacity(_deployment(0, 0))
    plain = Evaluator(problem).simulate(_deployment(0, 0), rate)
    slowed = Evaluator(calibrated).simulate(_deployment(0, 0), rate)
    apart = Evaluator(calibrated).simulate(_deployment(0, 1), rate)
    assert slowed.ttft_pct.mean > 1.8 * plain.ttft_pct.mean  # prefill twice as slow, plus queueing
    assert slowed.tpot_pct.mean > 1.2 * plain.tpot_pct.mean
    assert apart.tpot_pct.mean == pytest.approx(plain.tpot_pct.mean, rel=0.05)
