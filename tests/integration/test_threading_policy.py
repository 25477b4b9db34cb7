"""The OpenMP environment reaches each instance's process before torch loads (transfer/hosting.py
``openmp_options``): a multi-threaded instance spins a bounded while between a step's parallel
regions (ACTIVE with libgomp's default spin count) instead of sleeping after each (PASSIVE), and a
one-thread instance keeps the environment it inherits."""
from __future__ import annotations

from pathlib import Path

import pytest

from tandem.engine.params import SamplingParams


def _environ_of(title: str) -> dict[str, str]:
    """The environment of the one process on this host whose title starts with ``title`` (Ray
    names an actor's process ``ray::ClassName``)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(title.encode()):
                found.append((proc / "environ").read_bytes())
        except OSError:
            continue
    assert len(found) == 1, f"{len(found)} processes titled {title!r}"
    return dict(item.decode(errors="replace").split("=", 1) for item in found[0].split(b"\0") if b"=" in item)


@pytest.fixture(scope="module")
def two_instances(ray_cluster, tiny_llama_dir):
    from tandem.cluster.launcher import Cluster
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
    from tandem.engine.engine import EngineConfig

    engine = EngineConfig(dtype="float32", num_blocks=64)
    config = LaunchConfig(name="threads", model_dir=str(tiny_llama_dir), mode="disaggregated",
                          prefill=InstanceGroup(1, engine, num_cpus=2, num_threads=2),
                          decode=InstanceGroup(1, engine, num_cpus=1, num_threads=1))
    cluster = Cluster.launch(config, timeout_s=120)
    yield cluster
    cluster.shutdown()


def test_a_multi_threaded_instance_spins_briefly_and_a_single_threaded_one_inherits(two_instances):
    out = two_instances.client(timeout_s=60).generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0))
    assert len(out.token_ids) == 3
    prefill, decode = _environ_of("ray::PrefillActor"), _environ_of("ray::DecodeActor")
    assert (prefill.get("OMP_WAIT_POLICY"), prefill.get("GOMP_SPINCOUNT")) == ("ACTIVE", "300000")
    assert "GOMP_SPINCOUNT" not in decode  # a one-thread engine has no OpenMP workers to wait for
