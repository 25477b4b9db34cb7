"""Validated cluster specs as the launcher receives them (``cluster.deployment.launch_config``):
router limits, the example specs, and the GPUs a pool reserves."""
from __future__ import annotations

from pathlib import Path

import pytest

from tandem.cluster.spec import load_spec, parse_spec
from tests.spec_helpers import base, expect_error, with_value
from tests.unit.test_spec import EXAMPLES


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_the_router_limits_and_migration_policy_reach_the_launch_config(mode: str) -> None:
    from tandem.cluster.deployment import launch_config

    data = with_value(base(), "router.request_timeout_s", 42.5)
    data = with_value(data, "migration", {"enabled": True, "max_stages": 0})
    if mode == "colocated":
        data = {**{k: v for k, v in data.items() if k not in ("prefill", "decode")},
                "mode": "colocated", "instances": {"device": "cpu"}}
    config = launch_config(parse_spec(data), "/m")
    assert config.mode == mode and config.request_timeout_s == 42.5
    assert config.migration.enabled and config.migration.max_stages == 0


@pytest.mark.parametrize("path", [p for p in EXAMPLES if not load_spec(p).needs_planning],
                         ids=lambda p: p.name)
def test_every_explicit_example_is_one_the_launcher_accepts(path: Path) -> None:
    from tandem.cluster.deployment import launch_config

    spec = load_spec(path)
    config = launch_config(spec, "/m")
    groups = [config.decode] if spec.mode == "colocated" else [config.prefill, config.decode]
    sections = list(spec.sections.values())
    assert [g.replicas for g in groups] == [s.replicas for s in sections]
    assert [g.engine.device for g in groups] == [s.device for s in sections]


@pytest.mark.parametrize("device, num_gpus, reserved", [
    ("cuda", None, 1.0),  # one GPU per cuda instance by default
    ("cuda", 0.5, 0.5),  # two small instances share one
    ("cpu", None, 0.0),
    ("cpu", 0, 0.0),
])
def test_cuda_pools_reserve_gpus(device: str, num_gpus, reserved: float) -> None:
    from tandem.cluster.deployment import launch_config
    from tandem.cluster.launcher_config import instance_bundle

    data = with_value(base(), "decode.device", device)
    if num_gpus is not None:
        data = with_value(data, "decode.num_gpus", num_gpus)
    config = launch_config(parse_spec(data), "/m")
    assert config.decode.num_gpus == reserved and config.prefill.num_gpus == 0
    expected = {"CPU": 1.0, "GPU": reserved} if reserved else {"CPU": 1.0}
    assert instance_bundle(config.decode) == expected


@pytest.mark.parametrize("device, num_gpus, fragment", [
    ("cpu", 1, "only cuda pools reserve GPUs"),
    ("cuda", 2, "must be in (0, 1], got 2"),
    ("cuda", 0, "must be in (0, 1], got 0"),
])
def test_gpu_shares_that_make_no_sense_are_refused(device: str, num_gpus, fragment: str) -> None:
    data = with_value(with_value(base(), "decode.device", device), "decode.num_gpus", num_gpus)
    expect_error(data, "decode.num_gpus", fragment)


def test_chunked_prefill_reaches_the_colocated_engines() -> None:
    from tandem.cluster.deployment import launch_config

    data = {**{k: v for k, v in base().items() if k not in ("prefill", "decode")}, "mode": "colocated",
            "instances": {"device": "cpu", "chunked_prefill": True, "max_batch_tokens": 256,
                          "max_num_seqs": 16}}
    scheduler = launch_config(parse_spec(data), "/m").decode.engine.scheduler
    assert scheduler.chunked_prefill and scheduler.max_num_batched_tokens == 256
    assert launch_config(parse_spec(base()), "/m").decode.engine.scheduler.chunked_prefill is False


@pytest.mark.parametrize("device, num_gpus", [("cuda", None), ("cuda", 0.5), ("cpu", None)])
def test_memory_fraction_is_of_the_gpu_share_on_cuda_and_of_host_ram_on_cpu(device: str, num_gpus) -> None:
    from tandem.cluster.deployment import host_memory_bytes, launch_config
    from tandem.engine.engine import EngineConfig

    data = with_value(with_value(base(), "decode.device", device), "decode.memory_fraction", 0.25)
    if num_gpus is not None:
        data = with_value(data, "decode.num_gpus", num_gpus)
    engine = launch_config(parse_spec(data), "/m").decode.engine
    if device == "cuda":  # the engine measures its GPU once the model is loaded
        assert (engine.memory_fraction, engine.device_share) == (0.25, num_gpus or 1.0)
        assert engine.kv_cache_bytes == EngineConfig().kv_cache_bytes  # not read
    else:
        assert engine.memory_fraction is None and engine.kv_cache_bytes == int(0.25 * host_memory_bytes())


def test_memory_fraction_on_a_parallel_cuda_pool_is_refused() -> None:
    data = with_value(with_value(base(), "decode.device", "cuda"), "decode.memory_fraction", 0.5)
    expect_error(with_value(data, "decode.tp", 2), "decode.memory_fraction", "needs num_blocks")


def test_a_list_of_decode_pools_launches_each_with_its_own_shape(tmp_path: Path) -> None:
    """``decode`` as a list: each pool its own (tp, pp), replicas and CPUs; instances numbered
    across pools; errors and pre-flight name the pool by its index; the spec round-trips."""
    from tandem.cluster.deployment import launch_config
    from tandem.cluster.launcher_config import instance_groups
    from tandem.cluster.preflight import Capacity, shortfall
    from tandem.cluster.spec import spec_to_dict
    from tandem.placement.model_spec import load_model
    from tests.spec_helpers import TINY_CONFIG, write_model_config

    model = write_model_config(tmp_path / "m", {**TINY_CONFIG, "intermediate_size": 128, "vocab_size": 256})
    data = with_value(base(model), "decode", [{"tp": 2, "num_cpus": 0.5}, {"pp": 2, "replicas": 2}])
    spec = parse_spec(data)
    assert list(spec.sections) == ["prefill", "decode.0", "decode.1"]
    assert parse_spec(spec_to_dict(spec)) == spec
    config = launch_config(spec, str(model))
    groups = instance_groups(config)["decode"]
    assert list(groups) == ["test-decode-0", "test-decode-1", "test-decode-2"]
    shapes = [(g.engine.parallelism.tp, g.engine.parallelism.pp, g.num_cpus) for g in groups.values()]
    assert shapes == [(2, 1, 0.5), (1, 2, 1.0), (1, 2, 1.0)]
    # 1 prefill CPU + 2 x 0.5 + 2 instances x 2 workers x 1 = 6 CPUs.
    small = Capacity(cpus=5, largest_node_cpus=5, gpus=0, largest_node_gpus=0, memory_bytes=1e12,
                     largest_node_memory_bytes=1e12)
    assert "decode.1: 2 x (tp=1 x pp=2 workers) x 1 CPU = 6 CPU" in shortfall(config, small, load_model(str(model)))
    expect_error(with_value(base(model), "decode", [{}, {"tp": 3}]), "decode.1.tp", "does not divide")
    expect_error(with_value(base(model), "decode", [{}, {"replicas": "two"}]), "decode.1.replicas", "expected int")
    expect_error(with_value(base(model), "decode", []), "decode", "an empty list")
    expect_error(with_value(base(model), "decode", [{}, {"block_size": 32}]), "decode.1.block_size",
                 "must equal prefill.block_size")


def test_one_node_pools_launch_strict_packed_and_preflight_checks_one_node_holds_them() -> None:
    from tandem.cluster.deployment import launch_config
    from tandem.cluster.preflight import resource_shortfall

    data = with_value(with_value(base(), "decode.tp", 2), "decode.one_node", True)
    config = launch_config(parse_spec(data), "/m")
    assert config.decode.strategy == "STRICT_PACK" and config.prefill.strategy == "PACK"
    # Four nodes of one CPU: the tp=2 instance's two 1-CPU workers fit only spread over two.
    assert resource_shortfall(config, "CPU", 4, 1) == (
        "decode.one_node: each instance needs 2 workers x 1 CPU = 2 CPU on one node, but the largest "
        "node of the Ray cluster has 1")
    spread = launch_config(parse_spec(with_value(base(), "decode.tp", 2)), "/m")
    assert resource_shortfall(spread, "CPU", 4, 1) is None
