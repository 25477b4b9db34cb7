"""Ray fixtures for integration tests: one local cluster per module, tiny models, bounded waits."""
from __future__ import annotations

import os
import random
import time

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # address="local": never attach to a head some other test (or person) started.
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="tandem",
             log_to_driver=False)
    yield ray
    ray.shutdown()


def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.05):
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s (last value {value!r})")
        time.sleep(interval_s)


def all_blocks_free(cluster) -> bool:
    stats = cluster.stats()["instances"]
    return all(s.get("free_blocks") == s.get("num_blocks") and not s.get("held")
               and not s.get("pending_admissions") and not s.get("migrating_out") for s in stats.values())


def assert_all_blocks_free(cluster, timeout_s: float = 30.0) -> None:
    wait_until(lambda: all_blocks_free(cluster), timeout_s)


def assert_simulation_within(rate: float, row: dict, tolerance: float) -> None:
    """Every simulated percentile of ``row`` (benchmarks.sim_vs_real.compare's) within
    ``tolerance`` of the measured one."""
    print(f"rate {rate:.2f} req/s", row)  # shown with -s; the tolerance below is what counts
    errors = {key: cell["sim_err"] for key, cell in row.items()}
    assert all(abs(e) <= tolerance for e in errors.values()), errors


def mixed_workload(seed: int, count: int, max_prompt: int, max_tokens: tuple[int, int]):
    """(prompts, params) for a tiny byte-vocabulary model: random prompts of 1..``max_prompt`` ids;
    odd requests greedy, even ones seeded top-k sampling; ``max_tokens`` drawn from the range."""
    from tandem.engine import SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, max_prompt))] for _ in range(count)]
    params = [SamplingParams(max_tokens=rng.randint(*max_tokens), temperature=0, ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=rng.randint(*max_tokens), temperature=0.9, top_k=40, seed=i,
                             ignore_eos=True)
              for i in range(count)]
    return prompts, params
