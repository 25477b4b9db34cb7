"""The simulator against queueing theory (DistServe's M/D/1 model of a prefill instance)."""
from __future__ import annotations

import pytest

from tandem.placement.hardware import get_profile
from tandem.placement.latency import AnalyticLatency
from tandem.placement.model_spec import load_model
from tandem.placement.policy import Policy
from tandem.placement.sim_core import InstanceModel, Slo
from tandem.placement.sim_disagg import simulate_disaggregated
from tandem.placement.workload import Arrival, Fixed, Workload, sample_base

PROMPT = 512
REQUESTS = 40_000
SEEDS = (0, 1)
LOOSE = Slo(ttft_ms=1e6, tpot_ms=1e6)


class ConstantPrefill:
    """A step model with fixed prefill latency and pipeline occupancy (no decode)."""

    def __init__(self, latency: float, busy: float) -> None:
        self.latency, self.busy = latency, busy

    def prefill(self, seqs: int, tokens: int, sum_sq: float) -> tuple[float, float]:
        return self.latency, self.busy

    def decode(self, batch: int, sum_ctx: int) -> float:
        raise AssertionError("no decode in these runs")

    def mixed(self, seqs: int, tokens: int, sum_sq: float, batch: int, sum_ctx: int) -> float:
        raise AssertionError("no colocated steps in these runs")


def _mean_ttft(step, rate: float, requests: int = REQUESTS,  # type: ignore[no-untyped-def]
               seeds: tuple[int, ...] = SEEDS) -> float:
    """Mean TTFT over the seeds: one prefill instance, batch size 1, decode-free requests."""
    workload = Workload(arrival=Arrival(), rate=None, input_len=Fixed(PROMPT), output_len=Fixed(1))
    policy = Policy(prefill_token_budget=PROMPT, prefill_max_batch=1)
    inst = InstanceModel(step, kv_blocks=10**6)
    means = []
    for seed in seeds:
        trace = sample_base(workload, requests, seed, max_positions=2048)
        result = simulate_disaggregated([inst], [], [[(0.0, 0.0)]], policy, trace, rate, LOOSE,
                                        window=(requests // 40, requests))
        means.append(result.ttft_pct.mean)
    return sum(means) / len(means)


@pytest.mark.parametrize("load", [0.3, 0.5, 0.7, 0.85])
def test_prefill_queue_matches_md1(load: float) -> None:
    # A real OPT-13B prefill on one A100 as the deterministic service time D.
    step = AnalyticLatency(load_model("opt-13b"), get_profile("A100-80GB"), "fp16", 1, 1)
    service = step.prefill(1, PROMPT, PROMPT**2)[0]
    rate = load / service
    expected = service + rate * service**2 / (2 * (1 - rate * service))
    assert _mean_ttft(step, rate) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("load", [0.4, 0.8])
def test_two_stage_pipeline_matches_distserve_formula(load: float) -> None:
    # 2-way pipeline: a batch takes D end to end but the next may enter after D/2, so the queue is
    # M/D/1 with service D/2: mean TTFT = D + R D^2 / (4 (2 - R D)).
    service = 0.05
    rate = load / service
    expected = service + rate * service**2 / (4 * (2 - rate * service))
    assert _mean_ttft(ConstantPrefill(service, service / 2), rate) == pytest.approx(expected, rel=0.05)


def test_queueing_grows_with_load() -> None:
    step = ConstantPrefill(0.05, 0.05)
    waits = [_mean_ttft(step, load / 0.05, 5000, (0,)) - 0.05 for load in (0.2, 0.5, 0.8)]
    assert waits[0] < waits[1] < waits[2]
    assert waits[0] > 0
