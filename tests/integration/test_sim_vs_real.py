"""The simulator against the real cluster: 1 prefill + 1 decode instance served through the router,
calibrated by `tandem profile --served`'s probes, then a Poisson workload at a moderate rate; the
simulated TTFT/TPOT percentiles on the same arrivals must be within 15% of the measured ones.

The model steps are paced (engine/pacing.py): every step lasts what a fixed latency form gives its
batch. Everything else is real — router, step loops, KV export/fetch through the object store, the
schedulers' batching and admission — so what this checks is the simulator's account of the
cluster, on a shared host whose compute speed drifts by tens of percent within minutes. The same
comparison with the real SmolLM2's compute is benchmarks/sim_vs_real.py (RESULTS.md).
"""
from __future__ import annotations

import asyncio
import random

import pytest

from benchmarks.sim_vs_real import (cluster_profile, compare, launch, run_real, saturation_rate,
                                    simulate, step_model, workload)
from benchmarks.sim_vs_real_costs import measure_transfer, transfer_cost
from tandem.cluster.served_profile import PROBE_TOKENS, PROBES, probe
from tandem.engine.pacing import StepPace
from tests.integration.conftest import assert_all_blocks_free, assert_simulation_within

# Decode-bound like the real model: 160-token prompts prefill in ~150 ms, a step of 8 sequences
# at ~200 tokens of context takes ~100 ms. Long enough that the Python and Ray work around each
# step (a few ms, more when other jobs load the host) stays a small part of it.
PACE = StepPace(prefill=(0.06, 6e-4, 0.0), decode=(0.045, 1.5e-3, 3e-5))
REQUESTS = 40
LOAD = 0.55  # share of the simulated saturation rate
TOLERANCE = 0.15


@pytest.fixture(scope="module")
def paced_pair(ray_cluster, tiny_llama_dir):
    cluster = launch(str(tiny_llama_dir), "ray", step_pace=PACE)
    yield cluster
    cluster.shutdown()


def test_simulated_percentiles_match_the_paced_cluster(paced_pair, tiny_llama_dir):
    model_dir = str(tiny_llama_dir)
    client = paced_pair.client(timeout_s=300)
    prefill = next(h for name, h in paced_pair.actors.items() if "-prefill-" in name)
    rng = random.Random(5)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(10, 256) for _ in range(n)]

    xfer = measure_transfer(model_dir)  # the ray transport's export/fetch and the actor hops

    async def measure():
        await run_real(client, workload(4, 4.0, seed=99, vocab=256))  # warm-up
        samples = await probe(client, prefill, prompt, PROBES, PROBE_TOKENS)
        profile = cluster_profile(samples)
        step, transfer = step_model(profile, model_dir, xfer["export"]), transfer_cost(xfer)
        rate = LOAD * saturation_rate(step, transfer)
        reqs = workload(REQUESTS, rate, seed=11, vocab=256)
        sent, results = await run_real(client, reqs)
        sim = simulate(step, transfer, sent, [len(p) for _, p, _ in reqs], [o for _, _, o in reqs],
                       router_delay=profile.router_delay_s)
        return rate, compare(results, {"sim": sim})

    assert_simulation_within(*asyncio.run(asyncio.wait_for(measure(), 600)), TOLERANCE)
    assert_all_blocks_free(paced_pair)
