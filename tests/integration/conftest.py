"""Ray fixtures for integration tests: one local cluster per module, tiny models, bounded waits."""
from __future__ import annotations

import os
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
               and not s.get("pending_admissions") for s in stats.values())


def assert_all_blocks_free(cluster, timeout_s: float = 30.0) -> None:
    wait_until(lambda: all_blocks_free(cluster), timeout_s)
