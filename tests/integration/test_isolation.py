"""A poisoned request fails alone; an instance whose step fails is dropped at once, its requests
ending with the cause, and the cluster goes on serving from the other instances.

The faults come from ``tests/integration/faults.py``, installed in every worker of this module's
Ray cluster; a 2 prefill + 2 decode cluster of a tiny Llama, half a CPU per instance."""
from __future__ import annotations

from pathlib import Path

import pytest

from tandem.engine import SamplingParams
from tests.integration.conftest import all_blocks_free, wait_until
from tests.integration.faults import DETOKENIZE_FAULT, STEP_FAULT

PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
NEXT = 40


@pytest.fixture(scope="module")
def ray_faulty():
    import ray

    root = str(Path(__file__).resolve().parents[2])  # the hook runs before a worker's own path is set
    runtime_env = {"env_vars": {"PYTHONPATH": root},
                   "worker_process_setup_hook": "tests.integration.faults.install"}
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="tandem", log_to_driver=False,
             runtime_env=runtime_env)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_faulty, tiny_llama_dir):
    """One cluster for the module, its tests in file order: the failed step comes last."""
    from tests.integration.test_cluster import _launch

    launched = _launch("isolation", tiny_llama_dir)
    yield launched
    launched.shutdown()


def _serves(client, count: int = NEXT) -> None:
    """The next ``count`` requests all finish normally, with the same (greedy) tokens."""
    outs = client.generate_batch([[9, 8, 7, i % 200 + 10] for i in range(count)], PARAMS)
    assert [(o.finish_reason, o.error) for o in outs] == [("length", None)] * count


def test_a_poisoned_request_fails_alone(cluster):
    client = cluster.client(timeout_s=60)
    ids = [client.submit(prompt, PARAMS) for prompt in ([5, 6, 7, 8], [DETOKENIZE_FAULT, 6, 7], [10, 11, 12])]
    good, bad, other = (client.result(rid) for rid in ids)
    assert bad.finish_reason == "error" and "injected detokenizer fault" in bad.error
    assert (good.finish_reason, other.finish_reason) == ("length", "length")
    _serves(client)
    assert len(cluster.stats()["instances"]) == 4  # no instance was lost
    wait_until(lambda: all_blocks_free(cluster))


def test_a_failed_step_drops_its_instance_at_once_and_the_rest_serve(cluster):
    client = cluster.client(timeout_s=60)
    out = client.generate([STEP_FAULT, 6, 7], PARAMS)  # fails a prefill instance's step
    assert out.finish_reason == "error"
    assert "prefill instance" in out.error and "its step failed (RuntimeError: injected step fault)" in out.error
    instances = cluster.stats()["instances"]
    failed = [name for name in cluster.actors if "-prefill-" in name and name not in instances]
    assert len(failed) == 1 and len(instances) == 3  # dropped from the router's pools
    _serves(client)
    wait_until(lambda: all_blocks_free(cluster))


def test_a_failed_step_restarts_a_restartable_instance_which_rejoins(ray_faulty, tiny_llama_dir):
    """With restarts allowed, the instance whose step failed exits after reporting it; Ray starts
    a fresh process, which the router puts back in service."""
    import os

    import ray

    from tandem.cluster.launcher import Cluster
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
    from tandem.engine.engine import EngineConfig

    engine = EngineConfig(dtype="float32", num_blocks=64, block_size=16)
    config = LaunchConfig(name="phoenix", model_dir=str(tiny_llama_dir),
                          prefill=InstanceGroup(1, engine, num_cpus=0.5, max_restarts=1),
                          decode=InstanceGroup(1, engine, num_cpus=0.5), health_timeout_s=5.0)
    cluster = Cluster.launch(config, timeout_s=120)
    try:
        prefill = cluster.actors["phoenix-prefill-0"]
        pid = ray.get(prefill.__ray_call__.remote(lambda actor: os.getpid()), timeout=30)
        client = cluster.client(timeout_s=60)
        out = client.generate([STEP_FAULT, 6, 7], PARAMS)
        assert out.finish_reason == "error" and "its step failed (RuntimeError: injected step fault)" in out.error
        wait_until(lambda: all("error" not in s for s in cluster.stats()["instances"].values())
                   and len(cluster.stats()["instances"]) == 2, timeout_s=90)
        assert ray.get(prefill.__ray_call__.remote(lambda actor: os.getpid()), timeout=30) != pid
        _serves(client, 10)
        wait_until(lambda: all_blocks_free(cluster))
    finally:
        cluster.shutdown()
