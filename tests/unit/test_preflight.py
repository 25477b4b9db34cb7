"""Pre-flight CPU check: infeasible launches are named before anything starts."""
from __future__ import annotations

import pytest

from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
from tandem.cluster.preflight import cpu_shortfall
from tandem.engine.engine import EngineConfig


def _config(prefill=(1, 1.0), decode=(1, 1.0), mode="disaggregated") -> LaunchConfig:
    group = lambda replicas, cpus: InstanceGroup(replicas, EngineConfig(), num_cpus=cpus)
    return LaunchConfig(name="t", model_dir="/m", mode=mode, decode=group(*decode),
                        prefill=group(*prefill) if mode == "disaggregated" else None)


@pytest.mark.parametrize("config, total, largest, named", [
    (_config(prefill=(1, 1000.0)), 2.0, 2.0,
     "prefill.num_cpus: each instance needs 1000 CPU, but the largest node of the Ray cluster has 2"),
    (_config(prefill=(8, 1.0)), 2.0, 2.0,
     "prefill: 8 x 1 CPU + decode: 1 x 1 CPU = 9 CPU, but the Ray cluster has 2 CPU in all"),
    (_config(decode=(3, 1.0), mode="colocated"), 2.0, 4.0, "instances: 3 x 1 CPU = 3 CPU"),
])
def test_infeasible_launches_are_named(config, total, largest, named):
    assert named in cpu_shortfall(config, total, largest)


@pytest.mark.parametrize("config, total, largest", [
    (_config(), 2.0, 2.0),  # exactly fits
    (_config(prefill=(2, 0.5), decode=(2, 0.5)), 2.0, 1.0),
    (_config(prefill=(1, 0.0), decode=(1, 0.0)), 0.0, 0.0),  # zero-CPU instances need nothing
])
def test_feasible_launches_pass(config, total, largest):
    assert cpu_shortfall(config, total, largest) is None
