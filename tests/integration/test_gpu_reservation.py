"""Instances reserve their GPUs from Ray (fake GPUs: resource accounting only, the engines run on
the CPU): each gets its own through its placement group, sees only that one
(CUDA_VISIBLE_DEVICES), and a launch asking for more GPUs than the cluster has fails before
anything starts."""
from __future__ import annotations

import pytest

from tandem.engine import SamplingParams
from tests.integration.conftest import wait_until


@pytest.fixture(scope="module")
def ray_with_gpus():
    import ray

    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, namespace="tandem",
             log_to_driver=False)
    yield ray
    ray.shutdown()


def _config(name: str, model_dir, replicas: int = 1):
    from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
    from tandem.engine.engine import EngineConfig

    group = InstanceGroup(replicas, EngineConfig(dtype="float32", num_blocks=16), num_cpus=0.5, num_gpus=1)
    return LaunchConfig(name=name, model_dir=str(model_dir), prefill=group, decode=group)


def test_each_instance_holds_its_own_gpu(ray_with_gpus, tiny_llama_dir):
    import os

    import ray

    from tandem.cluster.launcher import Cluster, LaunchError

    cluster = Cluster.launch(_config("gpus", tiny_llama_dir), timeout_s=120)
    try:
        assert ray.available_resources().get("GPU", 0) == 0
        visible = {name: ray.get(h.__ray_call__.remote(lambda actor: os.environ.get("CUDA_VISIBLE_DEVICES")),
                                 timeout=30) for name, h in cluster.actors.items()}
        assert sorted(visible.values()) == ["0", "1"]  # one GPU each, no two the same
        out = cluster.client(timeout_s=60).generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0))
        assert out.finish_reason == "length"
        before = ray.util.list_named_actors(all_namespaces=True)
        with pytest.raises(LaunchError, match=r"cannot start: prefill: 2 x 1 GPU \+ decode: 2 x 1 GPU = 4 GPU, "
                                              r"but the Ray cluster has 2 GPU in all"):
            Cluster.launch(_config("more", tiny_llama_dir, replicas=2), timeout_s=30)
        assert ray.util.list_named_actors(all_namespaces=True) == before
    finally:
        cluster.shutdown()
    wait_until(lambda: ray.available_resources().get("GPU", 0) == 2)  # given back
