"""The simulator against a real chunked-prefill colocated instance: one instance served through the
router, its model steps paced (engine/pacing.py, including the mixed form of a chunked step), a
Poisson workload at a moderate rate, and the colocated simulator (placement/sim_colocated.py with
``chunked_prefill``) replaying the same arrivals and lengths with the same step forms: simulated
TTFT/TPOT p50/p90 within 15% of the measured ones.

What this checks is the simulator's account of chunked batching (decodes first, chunks of started
and waiting prompts in the step budget, a prompt's first token at its last chunk's step, the
budget shared with the decodes) against the real scheduler, router and step loop; the model's own
cost is the pace, identical on both sides.
"""
from __future__ import annotations

import asyncio
import statistics

import pytest

from benchmarks.sim_vs_real import compare, run_real, workload
from tandem.engine.pacing import StepPace
from tests.integration.conftest import assert_all_blocks_free, assert_simulation_within

PACE = StepPace(prefill=(0.03, 3e-4, 0.0), decode=(0.035, 1e-3, 2e-5))
BUDGET = 96  # tokens a step: most prompts (64..256 tokens) take two or three steps
MAX_SEQS = 32
NUM_BLOCKS = 1024
BLOCK_SIZE = 16
REQUESTS = 40
LOAD = 0.55  # share of the simulated saturation rate
TOLERANCE = 0.15


class PacedSteps:
    """placement's StepModel for steps paced by ``pace``: the simulator's batch sums in the pace's
    own forms (a chunked step's attention term is what the simulator passes as sum_sq)."""

    def __init__(self, pace: StepPace) -> None:
        self.pace = pace

    def prefill(self, seqs: int, tokens: int, sum_sq: float) -> tuple[float, float]:
        seconds = self.pace.of_sums(seqs, tokens, sum_sq, 0, 0)
        return seconds, seconds

    def decode(self, batch: int, sum_ctx: int) -> float:
        return self.pace.of_sums(0, 0, 0, batch, sum_ctx)

    def mixed(self, seqs: int, tokens: int, sum_sq: float, batch: int, sum_ctx: int) -> float:
        return self.pace.of_sums(seqs, tokens, sum_sq, batch, sum_ctx)


def simulate(arrivals, inputs, outputs, router_delay: float, rate: float = 1.0):
    from tandem.placement.policy import Policy
    from tandem.placement.sim_colocated import ColocatedSim
    from tandem.placement.sim_core import InstanceModel, Slo
    from tandem.placement.workload import BaseTrace

    # The real admission takes blocks while any are free: no watermark.
    policy = Policy(prefill_token_budget=BUDGET, decode_max_batch=MAX_SEQS, block_size=BLOCK_SIZE,
                    watermark=0.0, chunked_prefill=True)
    trace = BaseTrace(times=tuple(arrivals), inputs=tuple(inputs), outputs=tuple(outputs))
    sim = ColocatedSim([InstanceModel(PacedSteps(PACE), NUM_BLOCKS)], policy, trace, rate,
                       router_delay=router_delay)
    return sim.run(Slo(ttft_ms=1000, tpot_ms=100))


def saturation_rate(n: int = 200) -> float:
    reqs = workload(n, 1.0, seed=7, vocab=256)
    return simulate([1e-6 * i for i in range(n)], [len(p) for _, p, _ in reqs],
                    [o for _, _, o in reqs], 0.0).throughput


@pytest.fixture(scope="module")
def chunked_instance(ray_cluster, tiny_llama_dir):
    from tandem.cluster.launcher import Cluster
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
    from tandem.engine.engine import EngineConfig
    from tandem.engine.scheduler import SchedulerConfig

    scheduler = SchedulerConfig(max_num_seqs=MAX_SEQS, max_num_batched_tokens=BUDGET, chunked_prefill=True)
    engine = EngineConfig(dtype="float32", num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, scheduler=scheduler,
                          step_pace=PACE)
    cluster = Cluster.launch(LaunchConfig(name="simchunked", model_dir=str(tiny_llama_dir), mode="colocated",
                                          decode=InstanceGroup(1, engine, num_cpus=1, num_threads=1)),
                             timeout_s=300)
    yield cluster
    cluster.shutdown()


async def router_delay(client) -> float:
    """A lone request's time to first token beyond its one paced step (dispatch, the step loop's
    wake-up, the first token's report): the simulator adds it to every TTFT."""
    from tandem.engine.params import SamplingParams

    extra = []
    for i in range(5):
        prompt = [10 + i] * 32
        result = await client.agenerate(prompt, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        extra.append(result.metrics["ttft"] - PACE.mixed_seconds([(0, len(prompt))]))
    return max(0.0, statistics.median(extra))


def test_simulated_percentiles_match_a_paced_chunked_instance(chunked_instance):
    client = chunked_instance.client(timeout_s=300)

    async def measure():
        await run_real(client, workload(4, 4.0, seed=99, vocab=256))  # warm-up
        delay = await router_delay(client)
        rate = LOAD * saturation_rate()
        reqs = workload(REQUESTS, rate, seed=11, vocab=256)
        sent, results = await run_real(client, reqs)
        sim = simulate(sent, [len(p) for _, p, _ in reqs], [o for _, _, o in reqs], delay)
        return rate, compare(results, {"sim": sim})

    assert_simulation_within(*asyncio.run(asyncio.wait_for(measure(), 600)), TOLERANCE)
    assert_all_blocks_free(chunked_instance)
