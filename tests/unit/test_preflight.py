"""Pre-flight CPU check: infeasible launches are named before anything starts."""
from __future__ import annotations

import pytest

from tandem.cluster.launcher_config import InstanceGroup, LaunchConfig
from tandem.cluster.preflight import resource_shortfall
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
    assert named in resource_shortfall(config, "CPU", total, largest)


@pytest.mark.parametrize("config, total, largest", [
    (_config(), 2.0, 2.0),  # exactly fits
    (_config(prefill=(2, 0.5), decode=(2, 0.5)), 2.0, 1.0),
    (_config(prefill=(1, 0.0), decode=(1, 0.0)), 0.0, 0.0),  # zero-CPU instances need nothing
])
def test_feasible_launches_pass(config, total, largest):
    assert resource_shortfall(config, "CPU", total, largest) is None


def _model(**fields):
    from tandem.placement.model_spec import ModelSpec

    shape = dict(name="m", hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=256,
                 max_positions=512, gated_mlp=True, tied_embeddings=False, learned_positions=False,
                 default_dtype="fp32")
    return ModelSpec(**{**shape, **fields})


def _capacity(memory_gib=24.0, largest_gib=None, gpus=0.0, largest_node_gpus=None):
    from tandem.cluster.preflight import GIB, Capacity

    largest = memory_gib if largest_gib is None else largest_gib
    return Capacity(cpus=4, largest_node_cpus=4, gpus=gpus,
                    largest_node_gpus=gpus if largest_node_gpus is None else largest_node_gpus,
                    memory_bytes=memory_gib * GIB, largest_node_memory_bytes=largest * GIB)


def _engine_config(num_gpus=0.0, **fields):
    return LaunchConfig(name="t", model_dir="/m", prefill=InstanceGroup(1, EngineConfig(dtype="float32")),
                        decode=InstanceGroup(2, EngineConfig(dtype="float32", **fields), num_gpus=num_gpus))


def test_memory_is_weights_plus_the_kv_cache_the_engine_will_allocate():
    from tandem.cluster.preflight import instance_memory_bytes

    model = _model()  # K and V: 2 layers x 2 heads x 16 dims x 4 bytes x 2 = 512 bytes per token
    weights = (2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3) + 256 * 64 * 2) * 4
    assert instance_memory_bytes(InstanceGroup(1, EngineConfig(dtype="float32", num_blocks=10, block_size=16)),
                                 model) == (weights, 10 * 16 * 512)
    by_budget = InstanceGroup(1, EngineConfig(dtype="float32", block_size=16, kv_cache_bytes=100_000))
    assert instance_memory_bytes(by_budget, model)[1] == (100_000 // 8192) * 8192  # whole blocks
    bf16 = InstanceGroup(1, EngineConfig(dtype="bfloat16", num_blocks=10, block_size=16))
    assert instance_memory_bytes(bf16, model) == (weights // 2, 10 * 16 * 256)
    huge_block = InstanceGroup(1, EngineConfig(dtype="float32", block_size=1 << 20, kv_cache_bytes=1 << 20))
    assert instance_memory_bytes(huge_block, model)[1] == (1 << 20) * 512  # at least one block


@pytest.mark.parametrize("config, capacity, named", [
    (_engine_config(num_blocks=100_000_000), _capacity(),
     "decode: each instance needs at least 763 GiB of host memory (weights"),
    (_engine_config(num_blocks=100_000_000), _capacity(),
     "KV cache 763 GiB, num_blocks=100000000 x block_size=16), but the largest node of the Ray cluster has 24 GiB"),
    (_engine_config(num_blocks=1_000_000), _capacity(memory_gib=12, largest_gib=8),
     "prefill: 1 x 1 GiB + decode: 2 x 7.63 GiB of host memory = 16.3 GiB, but the Ray cluster has 12 GiB"),
    (_engine_config(device="cuda", num_gpus=1), _capacity(gpus=0),
     "decode.num_gpus: each instance needs 1 GPU, but the largest node of the Ray cluster has 0"),
    (_engine_config(device="cuda", num_gpus=1), _capacity(gpus=1),
     "decode: 2 x 1 GPU = 2 GPU, but the Ray cluster has 1 GPU in all"),
    (_engine_config(device="cuda", num_gpus=0.5), _capacity(gpus=2, largest_node_gpus=0.25),
     "decode.num_gpus: each instance needs 0.5 GPU, but the largest node of the Ray cluster has 0.25"),
    (_engine_config(device="cuda"), _capacity(gpus=1), "decode.num_gpus: a cuda instance must reserve a GPU"),
])
def test_launches_beyond_memory_or_without_gpus_are_named(config, capacity, named):
    from tandem.cluster.preflight import shortfall

    assert named in shortfall(config, capacity, _model())


def test_a_launch_that_fits_memory_and_gpus_passes():
    from tandem.cluster.preflight import shortfall

    assert shortfall(_engine_config(num_blocks=1024), _capacity(memory_gib=2), _model()) is None
    # cuda pools' weights and KV live on the GPU: host memory is not theirs to check
    assert shortfall(_engine_config(device="cuda", num_gpus=0.5, num_blocks=100_000_000), _capacity(gpus=1),
                     _model()) is None  # two half shares of one GPU
