"""cluster.spec: the example specs load, every class of mistake is refused with a message that
starts with the offending field, and a spec survives spec_to_dict -> parse_spec unchanged."""
from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from tandem.cluster.spec import (
    ClusterSpec, InstanceSpec, SpecError, dump_spec, load_spec, parse_spec, spec_to_dict)
from tests.spec_helpers import base, expect_error, with_value, write_model_config

SPECS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "specs"
EXAMPLES = sorted(SPECS_DIR.glob("*.yaml"))

@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model_config(tmp_path / "tiny")


# --- the examples ----------------------------------------------------------------------------

def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"smollm2-cpu.yaml", "smollm2-colocated.yaml", "llama3-8b-gpu.yaml",
            "auto-placement.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads_and_round_trips(path: Path) -> None:
    spec = load_spec(path)
    assert isinstance(spec, ClusterSpec)
    assert parse_spec(spec_to_dict(spec)) == spec
    assert parse_spec(yaml.safe_load(dump_spec(spec)), base_dir=path.parent) == spec
    if not spec.model_check.checked:
        assert spec.model_check.skipped_reason


def test_smollm2_cpu_example() -> None:
    spec = load_spec(SPECS_DIR / "smollm2-cpu.yaml")
    assert spec.mode == "disaggregated" and spec.placement == "explicit"
    assert spec.model.name == "smollm2" and spec.model.path is None
    assert spec.model.dtype == "float32"
    assert spec.prefill is not None and spec.decode is not None and spec.instances is None
    for section in (spec.prefill, spec.decode):
        assert (section.replicas, section.tp, section.pp, section.device) == (1, 1, 1, "cpu")
    assert spec.transfer.backend == "auto"
    assert spec.slo is not None and (spec.slo.ttft_ms, spec.slo.tpot_ms) == (1000, 75)
    assert not spec.needs_planning


def test_colocated_example() -> None:
    spec = load_spec(SPECS_DIR / "smollm2-colocated.yaml")
    assert spec.mode == "colocated"
    assert spec.prefill is None and spec.decode is None
    assert spec.instances is not None and spec.instances.replicas == 2
    assert list(spec.sections) == ["instances"]


def test_gpu_example_skips_model_checks_without_the_model() -> None:
    spec = load_spec(SPECS_DIR / "llama3-8b-gpu.yaml")
    assert spec.transfer.backend == "ray" and spec.model.dtype == "bfloat16"
    assert spec.prefill is not None and spec.decode is not None
    assert (spec.prefill.tp, spec.decode.tp) == (1, 1) and spec.decode.replicas == 1
    assert {s.device for s in spec.sections.values()} == {"cuda"}
    if not Path(spec.model.path or "").exists():
        assert not spec.model_check.checked
        assert "does not exist" in (spec.model_check.skipped_reason or "")


def test_gpu_example_passes_model_checks_with_llama3_shape(tmp_path: Path) -> None:
    # Llama-3-8B's published shape: 32 heads, 8 KV heads, 32 layers.
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32}))
    data = yaml.safe_load((SPECS_DIR / "llama3-8b-gpu.yaml").read_text())
    spec = parse_spec(with_value(data, "model.path", str(tmp_path)))
    assert spec.model_check.checked


def test_auto_placement_example_needs_planning() -> None:
    spec = load_spec(SPECS_DIR / "auto-placement.yaml")
    assert spec.placement == "auto" and spec.needs_planning and spec.slo is not None
    for section in spec.sections.values():
        assert (section.replicas, section.tp, section.pp) == (None, None, None)


# --- defaults --------------------------------------------------------------------------------

def test_defaults() -> None:
    spec = parse_spec(base())
    assert spec.mode == "disaggregated" and spec.placement == "explicit"
    assert spec.model.dtype == "auto"
    assert spec.prefill == InstanceSpec(replicas=1, tp=1, pp=1)
    assert spec.prefill.block_size == 16 and spec.prefill.max_batch_tokens == 8192
    assert spec.prefill.max_num_seqs == 128 and spec.prefill.num_cpus == 1.0
    assert spec.prefill.num_blocks is None and spec.prefill.memory_fraction is None
    assert (spec.transfer.backend, spec.transfer.timeout_s) == ("auto", 30.0)
    assert spec.router.prefill_policy == "least_tokens"
    assert spec.router.decode_policy == "most_free_blocks"
    assert spec.router.request_timeout_s == 600.0
    assert spec.slo is None and not spec.needs_planning
    assert spec.http is None


def test_http_section_defaults_to_one_local_ingress() -> None:
    spec = parse_spec(with_value(base(), "http", {"port": 8000}))
    assert (spec.http.host, spec.http.port, spec.http.replicas) == ("127.0.0.1", 8000, 1)


def test_empty_sections_take_defaults() -> None:
    spec = parse_spec({**base(), "router": None, "transfer": None, "slo": None})
    assert spec.router.request_timeout_s == 600.0 and spec.slo is None


def test_slo_attainment_default() -> None:
    spec = parse_spec({**base(), "slo": {"ttft_ms": 200, "tpot_ms": 20}})
    assert spec.slo is not None and spec.slo.attainment == 0.9


def test_auto_placement_fills_missing_sections_and_keeps_pinned_values() -> None:
    data = {"name": "a", "placement": "auto", "model": {"name": "x"},
            "decode": {"tp": 2}, "slo": {"ttft_ms": 1, "tpot_ms": 1}}
    spec = parse_spec(data)
    assert spec.prefill == InstanceSpec()
    assert spec.decode is not None and (spec.decode.tp, spec.decode.replicas) == (2, None)
    assert spec.needs_planning
    assert parse_spec(spec_to_dict(spec)) == spec


def test_auto_placement_fully_pinned_needs_no_planning() -> None:
    pinned = {"replicas": 1, "tp": 1, "pp": 1}
    data = {"name": "a", "placement": "auto", "model": {"name": "x"}, "prefill": pinned,
            "decode": pinned, "slo": {"ttft_ms": 1, "tpot_ms": 1}}
    assert not parse_spec(data).needs_planning


def test_relative_model_path_resolves_against_spec_dir(tmp_path: Path, model_dir: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**base(), "model": {"path": "tiny"}}))
    spec = load_spec(spec_file)
    assert spec.model.path == str(model_dir.resolve())
    assert spec.model_check.checked
    assert spec.model_check.config_path == str(model_dir.resolve() / "config.json")


def test_relative_model_path_with_base_dir(model_dir: Path) -> None:
    spec = parse_spec({**base(), "model": {"path": "tiny"}}, base_dir=model_dir.parent)
    assert spec.model.path == str(model_dir.resolve()) and spec.model_check.checked


# --- errors: layout, devices, model shape ----------------------------------------------------

@pytest.mark.parametrize("mode,change,field,fragment", [
    ("disaggregated", {"decode": None}, "decode", "required in disaggregated mode"),
    ("disaggregated", {"prefill": None}, "prefill", "required in disaggregated mode"),
    ("disaggregated", {"instances": {}}, "instances", "not allowed in disaggregated mode"),
    ("colocated", {}, "prefill", "not allowed in colocated mode (use instances)"),
    ("colocated", {"prefill": None, "decode": None}, "instances", "required in colocated mode"),
    ("colocated", {"prefill": None, "instances": {}}, "decode", "not allowed in colocated"),
], ids=["no-decode", "no-prefill", "disagg-instances", "colo-prefill", "colo-empty", "colo-decode"])
def test_sections_per_mode(mode: str, change: dict[str, Any], field: str, fragment: str) -> None:
    data = {k: v for k, v in {**base(), "mode": mode, **change}.items() if v is not None}
    expect_error(data, field, fragment)


def test_auto_placement_requires_slo() -> None:
    expect_error({**base(), "placement": "auto"}, "slo", "required when placement is auto")


def test_block_sizes_must_match_for_now() -> None:
    data = with_value(base(), "decode.block_size", 32)
    expect_error(data, "decode.block_size", "must equal prefill.block_size (16) for now")


@pytest.mark.parametrize("prefill,decode,culprit", [
    ("cpu", "cpu", "prefill.device is cpu"),
    ("cuda", "cpu", "decode.device is cpu"),
    ("cpu", "cuda", "prefill.device is cpu"),
])
@pytest.mark.parametrize("backend", ["nccl", "cuda_ipc"])
def test_gpu_backends_need_cuda(prefill: str, decode: str, culprit: str, backend: str) -> None:
    data = with_value(with_value(base(), "prefill.device", prefill), "decode.device", decode)
    expect_error(with_value(data, "transfer.backend", backend), "transfer.backend",
                 f"{backend} needs device cuda ({culprit})")


def test_nccl_on_cpu_in_colocated_mode() -> None:
    data = {"name": "c", "mode": "colocated", "model": {"name": "x"}, "instances": {},
            "transfer": {"backend": "nccl"}}
    expect_error(data, "transfer.backend", "instances.device is cpu")


@pytest.mark.parametrize("backend", ["nccl", "cuda_ipc"])
def test_gpu_backends_with_cuda_pass(backend: str) -> None:
    data = with_value(with_value(base(), "prefill.device", "cuda"), "decode.device", "cuda")
    assert parse_spec(with_value(data, "transfer.backend", backend)).transfer.backend == backend


@pytest.mark.parametrize("field,value,fragment", [
    ("decode.tp", 3, "tp=3 does not divide the 8 attention heads"),
    ("prefill.tp", 16, "tp=16 does not divide the 8 attention heads"),
    ("prefill.pp", 7, "pp=7 exceeds the 6 layers"),
])
def test_model_divisibility(model_dir: Path, field: str, value: int, fragment: str) -> None:
    error = expect_error(with_value(base(model_dir), field, value), field, fragment)
    assert fragment in error.reason


# tp=8 > 4 KV heads replicates each KV head on two ranks; pp=4 splits 6 layers 2, 2, 1, 1.
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 2), (2, 3), (1, 6), (8, 1), (1, 4)])
def test_model_divisibility_passes(model_dir: Path, tp: int, pp: int) -> None:
    data = with_value(with_value(base(model_dir), "prefill.tp", tp), "decode.pp", pp)
    spec = parse_spec(data)
    assert spec.model_check.checked and spec.model_check.skipped_reason is None


def test_kv_heads_default_to_heads(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_attention_heads": 6, "num_hidden_layers": 4}))
    expect_error(with_value(base(tmp_path), "decode.tp", 4), "decode.tp",
                 "tp=4 does not divide the 6 attention heads")
    assert parse_spec(with_value(base(tmp_path), "decode.tp", 3)).model_check.checked


def test_colocated_divisibility(model_dir: Path) -> None:
    data = {"name": "c", "mode": "colocated", "model": {"path": str(model_dir)},
            "instances": {"tp": 3}}
    expect_error(data, "instances.tp", "does not divide")


def test_unplanned_values_skip_divisibility(model_dir: Path) -> None:
    data = {**base(model_dir), "placement": "auto", "slo": {"ttft_ms": 1, "tpot_ms": 1}}
    spec = parse_spec(data)
    assert spec.needs_planning and spec.model_check.checked


def test_missing_model_path_skips_checks(tmp_path: Path) -> None:
    data = with_value(base(tmp_path / "absent"), "decode.tp", 3)  # would fail if checked
    spec = parse_spec(data)
    assert not spec.model_check.checked
    assert "does not exist" in (spec.model_check.skipped_reason or "")


@pytest.mark.parametrize("setup,fragment", [
    ("file", "is not a directory"),
    ("no-config", "has no config.json"),
    ("bad-json", "cannot read"),
    ("list-json", "not a JSON object"),
])
def test_broken_model_path(tmp_path: Path, setup: str, fragment: str) -> None:
    target = tmp_path / "model"
    if setup == "file":
        target.write_text("x")
    else:
        target.mkdir()
        if setup == "bad-json":
            (target / "config.json").write_text("{not json")
        elif setup == "list-json":
            (target / "config.json").write_text("[]")
    expect_error(base(target), "model.path", fragment)


def test_model_name_resolves_through_prepare(monkeypatch: pytest.MonkeyPatch,
                                             model_dir: Path) -> None:
    from tandem.engine import prepare

    monkeypatch.setattr(prepare, "resolve_model", lambda name: model_dir)
    spec = parse_spec(base())
    assert spec.model_check.config_path == str(model_dir / "config.json")
    expect_error(with_value(base(), "decode.tp", 3), "decode.tp", "tp=3 does not divide the 8 attention heads")


def test_unprepared_model_name_skips_checks(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))  # nothing prepared here
    spec = parse_spec(with_value({**base(), "model": {"name": "smollm2"}}, "decode.tp", 7))
    assert not spec.model_check.checked
    assert "not prepared" in (spec.model_check.skipped_reason or "")


# --- YAML files ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,line", [
    ("name: x\nmodel: {name: a\nprefill: {}\n", 3),
    ("name: x\nmodel:\n  name: a\n   dtype: auto\n", 4),
    ("name: x\nmodel:\n\tname: a\n", 3),
    ("name: [x\n", 2),
], ids=["unclosed-flow", "bad-indent", "tab", "unclosed-list"])
def test_malformed_yaml_names_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}:"), message
    assert "invalid YAML" in message


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("name: x\nmodel: {name: a}\ndecode: {tp: 1}\nprefill: {}\ndecode: {tp: 2}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith("decode: duplicate key (first at line 3)")
    assert f"{path}:5" in str(info.value)


def test_field_errors_point_at_the_line(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\nmodel:\n  name: a\nprefill:\n  replicas: 0\ndecode: {}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"prefill.replicas: must be >= 1, got 0 (at {path}:5)"


def test_missing_field_points_at_its_section(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\nmodel: {name: a}\nprefill: {}\ndecode: {}\nslo:\n  ttft_ms: 5\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith("slo.tpot_ms: required field missing")
    assert f"{path}:5" in str(info.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n"], ids=repr)
def test_empty_or_non_mapping_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=r"^spec: expected a mapping"):
        load_spec(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "nope.yaml")


# --- round trip and plumbing -----------------------------------------------------------------

@pytest.mark.parametrize("changes", [
    {},
    {"mode": "colocated", "prefill": None, "decode": None, "instances": {"replicas": 3}},
    {"placement": "auto", "prefill": None, "slo": {"ttft_ms": 10, "tpot_ms": 1.5}},
    {"prefill": {"memory_fraction": 0.5, "device": "cuda"},
     "decode": {"num_blocks": 10, "device": "cuda"}, "transfer": {"backend": "nccl"}},
    {"router": {"prefill_policy": "round_robin", "decode_policy": "round_robin"}},
], ids=["base", "colocated", "auto", "gpu", "policies"])
def test_round_trip(changes: dict[str, Any]) -> None:
    data = {k: v for k, v in {**base(), **changes}.items() if v is not None}
    spec = parse_spec(data)
    assert parse_spec(spec_to_dict(spec)) == spec
    assert parse_spec(yaml.safe_load(dump_spec(spec))) == spec


def test_round_trip_keeps_relative_path_meaning(model_dir: Path) -> None:
    spec = parse_spec({**base(), "model": {"path": "tiny"}}, base_dir=model_dir.parent)
    assert parse_spec(spec_to_dict(spec), base_dir=Path("/elsewhere")) == spec


def test_spec_to_dict_is_plain_data() -> None:
    data = spec_to_dict(parse_spec(base()))
    assert "model_check" not in data and "instances" not in data and "slo" not in data
    assert json.loads(json.dumps(data)) == data


def test_specs_are_frozen() -> None:
    spec = parse_spec(base())
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]
    assert hash(spec.transfer) == hash(parse_spec(base()).transfer)


def test_spec_error_pickles() -> None:
    error = SpecError("decode.tp", "bad", "f.yaml:3")
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.field, clone.reason, str(clone)) == ("decode.tp", "bad", str(error))
    assert isinstance(clone, ValueError)


def test_spec_structs_convert_from_msgspec_json() -> None:
    # Specs travel between actors as msgpack/JSON; decoding must give the same struct.
    spec = parse_spec(base())
    assert msgspec.json.decode(msgspec.json.encode(spec), type=ClusterSpec) == spec


def test_spec_modules_import_neither_ray_nor_torch() -> None:
    code = ("import sys, cluster.spec, cluster.spec_check, cluster.spec_yaml, cluster.spec_types;"
            "bad = [m for m in ('ray', 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


ALIAS_BOMB = "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text, field", [
    ('a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]\n' + ALIAS_BOMB, "b.0"),  # 9**9 values
    ("name: x\nx: &x [*x]\n", "x.0"),  # contains itself
    ("name: x\nprefill: &p {replicas: 1}\ndecode: *p\n", "decode"),
], ids=["bomb", "recursive", "plain"])
def test_yaml_aliases_are_refused_before_anything_expands(tmp_path: Path, text: str, field: str) -> None:
    from tandem.placement.problem import SpecError as PlacementSpecError
    from tandem.placement.problem import load_problem

    path = tmp_path / "alias.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=rf"^{re.escape(field)}: YAML aliases \(\*name\) are not supported"):
        load_spec(path)
    with pytest.raises(PlacementSpecError, match=rf"{re.escape(field)}: YAML aliases"):
        load_problem(path)
