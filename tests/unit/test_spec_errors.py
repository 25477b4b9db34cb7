"""cluster.spec errors, one class at a time: unknown keys, bad enum values, wrong types,
out-of-range values, missing fields. Every message starts with the offending field."""
from __future__ import annotations

from typing import Any

import pytest

from tandem.cluster.spec import parse_spec
from tests.spec_helpers import base, expect_error, with_value

# --- errors: one class at a time -------------------------------------------------------------

UNKNOWN_KEYS = [
    ("nmae", "nmae", "name, mode"),
    ("router.polcy", "router.polcy", "prefill_policy"),
    ("prefill.replica", "prefill.replica", "replicas"),
    ("decode.tensor_parallel", "decode.tensor_parallel", "tp"),
    ("model.revision", "model.revision", "path, name, dtype"),
    ("transfer.backend_name", "transfer.backend_name", "timeout_s"),
    ("slo.ttft", "slo.ttft", "ttft_ms"),
    ("http.workers", "http.workers", "port, host, replicas"),
    ("model_check", "model_check", "unknown field"),  # computed, never read from YAML
]


@pytest.mark.parametrize("key,field,fragment", UNKNOWN_KEYS, ids=[c[0] for c in UNKNOWN_KEYS])
def test_unknown_keys_are_errors(key: str, field: str, fragment: str) -> None:
    expect_error(with_value(base(), key, 1), field, "unknown field", fragment)


BAD_ENUMS = [
    ("mode", "split", "disaggregated, colocated"),
    ("placement", "manual", "explicit, auto"),
    ("model.dtype", "float16", "auto, float32, bfloat16"),
    ("prefill.device", "gpu", "cpu, cuda"),
    ("decode.device", None, "cpu, cuda"),
    ("transfer.backend", "foo", "auto, shm, ray, nccl, cuda_ipc"),
    ("router.prefill_policy", "random", "least_tokens, round_robin"),
    ("router.decode_policy", 3, "most_free_blocks, freeness, round_robin"),
]


@pytest.mark.parametrize("field,value,choices", BAD_ENUMS, ids=[c[0] for c in BAD_ENUMS])
def test_unknown_enum_values(field: str, value: Any, choices: str) -> None:
    expect_error(with_value(base(), field, value), field,
                 f"unknown value {value!r} (expected one of: {choices})")


WRONG_TYPES = [
    ("name", 5, "expected str, got int"),
    ("prefill.replicas", "two", "got str 'two'"),
    ("prefill.replicas", True, "got bool"),
    ("decode.tp", 1.5, "got float"),
    ("decode.block_size", None, "got null"),
    ("prefill.num_blocks", "many", "got str"),
    ("prefill.memory_fraction", "half", "got str"),
    ("decode.num_cpus", [1], "got array"),
    ("transfer.timeout_s", "soon", "expected float"),
    ("router.request_timeout_s", {"s": 1}, "expected float, got object"),
    ("migration.enabled", "yes", "expected bool"),
    ("slo.ttft_ms", "1e3", "1.0e+3"),
    ("model.path", 7, "got int"),
]


@pytest.mark.parametrize("field,value,fragment", WRONG_TYPES,
                         ids=[f"{c[0]}={c[1]!r}" for c in WRONG_TYPES])
def test_wrong_types(field: str, value: Any, fragment: str) -> None:
    data = with_value(base(), field, value)
    if field.startswith("slo."):
        data["slo"].setdefault("tpot_ms", 50)
    expect_error(data, field, fragment)


@pytest.mark.parametrize("section", ["model", "prefill", "decode", "transfer", "router", "migration", "http",
                                     "slo"])
@pytest.mark.parametrize("value", [[1, 2], "yes", 3])
def test_sections_must_be_mappings(section: str, value: Any) -> None:
    if section == "decode" and isinstance(value, list):  # a list of decode pools, each a mapping
        expect_error({**base(), section: value}, "decode.0", "expected a mapping, got int")
        return
    expect_error({**base(), section: value}, section, "expected a mapping")


@pytest.mark.parametrize("data", [[], "spec", None, 3], ids=repr)
def test_top_level_must_be_a_mapping(data: Any) -> None:
    expect_error(data, "spec", "expected a mapping")


OUT_OF_RANGE = [
    ("prefill.replicas", 0, "must be >= 1, got 0"),
    ("decode.replicas", -2, "must be >= 1, got -2"),
    ("prefill.tp", 0, "must be >= 1"),
    ("decode.pp", 0, "must be >= 1"),
    ("prefill.block_size", 0, "must be >= 1"),
    ("prefill.block_size", 12, "must be a power of 2, got 12"),
    ("decode.block_size", 24, "must be a power of 2"),
    ("prefill.num_blocks", 0, "must be >= 1"),
    ("prefill.memory_fraction", 0.0, "must be in (0, 1], got 0.0"),
    ("decode.memory_fraction", 1.5, "must be in (0, 1]"),
    ("decode.memory_fraction", float("nan"), "must be in (0, 1]"),
    ("prefill.max_batch_tokens", 0, "must be >= 1"),
    ("decode.max_num_seqs", 0, "must be >= 1"),
    ("decode.long_prefill_tokens", 0, "must be >= 1"),
    ("prefill.num_cpus", -0.5, "must be >= 0"),
    ("transfer.timeout_s", 0, "must be > 0, got 0"),
    ("transfer.timeout_s", -1.0, "must be > 0"),
    ("router.request_timeout_s", 0, "must be > 0"),
    ("router.result_ttl_s", 0, "must be > 0"),
    ("migration.interval_s", 0, "must be > 0"),
    ("migration.imbalance_threshold", -1, "must be >= 0"),
    ("migration.max_moves_per_pass", 0, "must be >= 1"),
    ("migration.max_blocks_in_flight", 0, "must be >= 1"),
    ("migration.max_bytes_in_flight", 0, "must be >= 1"),
    ("migration.min_stage_blocks", 0, "must be >= 1"),
    ("migration.max_stages", -1, "must be >= 0"),
    ("migration.recompute_max_tokens", -1, "must be >= 0"),
    ("migration.growth_horizon_tokens", -5, "must be >= 0"),
    ("slo.ttft_ms", 0, "must be > 0"),
    ("slo.tpot_ms", -5, "must be > 0"),
    ("slo.attainment", 0, "must be in (0, 1]"),
    ("slo.attainment", 1.01, "must be in (0, 1]"),
    ("name", "Bad_Name", "not DNS-like"),
    ("name", "-lead", "not DNS-like"),
    ("name", "trail-", "not DNS-like"),
    ("name", "", "not DNS-like"),
    ("name", "a" * 64, "not DNS-like"),
    ("model.name", "", "must not be empty"),
    ("http.port", 0, "must be a TCP port (1-65535), got 0"),
    ("http.port", 70000, "must be a TCP port"),
    ("http.host", "", "must name an interface"),
    ("http.replicas", 0, "must be 1 to 64 ingress processes, got 0"),
    ("http.replicas", 1000, "must be 1 to 64"),
]


def test_chunked_prefill_needs_a_budget_that_holds_every_decode() -> None:
    data = with_value(with_value(base(), "decode.chunked_prefill", True), "decode.max_batch_tokens", 64)
    expect_error(data, "decode.max_batch_tokens", "with chunked_prefill it must be >= max_num_seqs (128)")
    spec = parse_spec(with_value(data, "decode.max_num_seqs", 64))
    assert spec.decode.chunked_prefill and spec.decode.max_batch_tokens == 64


@pytest.mark.parametrize("field,value,fragment", OUT_OF_RANGE,
                         ids=[f"{c[0]}={c[1]!r}"[:40] for c in OUT_OF_RANGE])
def test_out_of_range(field: str, value: Any, fragment: str) -> None:
    data = with_value(base(), field, value)
    if field.startswith("slo."):
        data["slo"] = {"ttft_ms": 100, "tpot_ms": 10, **data["slo"]}
    if field.startswith("http."):
        data["http"] = {"port": 8000, **data["http"]}
    expect_error(data, field, fragment)


@pytest.mark.parametrize("value", [1, 2, 8, 16, 32, 128])
def test_power_of_two_block_sizes_pass(value: int) -> None:
    data = with_value(with_value(base(), "prefill.block_size", value), "decode.block_size", value)
    assert parse_spec(data).decode.block_size == value  # type: ignore[union-attr]


@pytest.mark.parametrize("section", ["prefill", "decode"])
def test_num_blocks_and_memory_fraction_are_exclusive(section: str) -> None:
    data = with_value(with_value(base(), f"{section}.num_blocks", 100),
                      f"{section}.memory_fraction", 0.5)
    expect_error(data, f"{section}.memory_fraction", "num_blocks", "not both")


@pytest.mark.parametrize("model,fragment", [
    ({"path": "/m", "name": "smollm2"}, "not both"),
    ({}, "give either path"),
    ({"dtype": "float32"}, "give either path"),
    ({"path": None, "name": None}, "give either path"),
], ids=["both", "neither", "dtype-only", "both-null"])
def test_model_needs_exactly_one_of_path_and_name(model: dict[str, Any], fragment: str) -> None:
    expect_error({**base(), "model": model}, "model", fragment)


@pytest.mark.parametrize("field", ["name", "model"])
def test_required_top_level_fields(field: str) -> None:
    data = base()
    del data[field]
    expect_error(data, field, "required field missing")


def test_slo_needs_both_targets() -> None:
    expect_error({**base(), "slo": {"ttft_ms": 100}}, "slo.tpot_ms", "required field missing")
