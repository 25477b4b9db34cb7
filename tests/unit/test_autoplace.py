"""placement: auto: cluster spec -> placement problem (fields, defaults, errors naming the field),
the plan keeps CPU pools at tp = pp = 1 unless planning.search allows more, keeps the pools' fixed
fields, and `tandem plan --write-spec` writes an explicit spec that loads back equal."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from tandem.cluster.autoplace import (
    check_plannable, cluster_from_nodes, fill_spec, host_cluster, plan_spec, planning_problem,
    summary)
from tandem.cluster.spec import PlanningCluster, SpecError, load_spec, parse_spec, spec_to_dict
from tandem.deploy.cli import main
from tandem.placement.calibrate import CalibratedEntry, CalibratedProfile, PhaseFit, save_profile
from tests.spec_helpers import write_model_config

# A tiny Llama shape: tp 2 and pp 2 would both divide it, so only the CPU default keeps them out.
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512,
          "torch_dtype": "float32"}
WORKLOAD = {"rate": 2, "input_len": {"dist": "uniform", "low": 8, "high": 64}, "output_len": 16}
SIZE = PlanningCluster(nodes=1, devices_per_node=6)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model_config(tmp_path / "tiny-llama", CONFIG)


def auto(model_dir: Path, **changes: Any) -> dict[str, Any]:
    """An auto spec's data; ``changes`` replace top-level sections (None deletes one)."""
    data: dict[str, Any] = {
        "name": "auto", "placement": "auto", "model": {"path": str(model_dir), "dtype": "float32"},
        "prefill": {"max_batch_tokens": 512, "max_num_seqs": 8, "num_cpus": 0.5},
        "decode": {"max_num_seqs": 24, "num_blocks": 64, "num_cpus": 0.5, "block_size": 16},
        "slo": {"ttft_ms": 1000, "tpot_ms": 100, "attainment": 0.9},
        # These tests check the disaggregated plan's mechanics; the choice of colocated instances
        # instead is tests/unit/test_placement_mode.py's.
        "planning": {"workload": copy.deepcopy(WORKLOAD), "search": {"requests": 60},
                     "allow_colocated": False},
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def expect(field: str, *fragments: str, data: dict[str, Any] | None = None, spec=None,
           size: PlanningCluster | None = SIZE) -> SpecError:
    with pytest.raises(SpecError) as info:
        plan_spec(parse_spec(data) if spec is None else spec, size)
    message = str(info.value)
    assert info.value.field == field and message.startswith(f"{field}: "), message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


# --- cluster spec -> placement problem ------------------------------------------------------------

def test_problem_takes_model_slo_pools_and_planning_sections(model_dir: Path) -> None:
    spec = parse_spec(auto(model_dir))
    problem = planning_problem(spec, SIZE)
    assert problem.model.name == "tiny-llama" and problem.model.heads == 4
    assert problem.dtype == "fp32" and problem.hardware.name == "cpu"  # cpu pools: cpu profile
    assert (problem.cluster.nodes, problem.cluster.devices_per_node) == (1, 6)
    assert (problem.slo.ttft_ms, problem.slo.tpot_ms, problem.slo.attainment) == (1000, 100, 0.9)
    assert problem.workload.rate == 2 and problem.workload.input_len.high == 64  # type: ignore[union-attr]
    # The simulated instances batch exactly like the launched ones.
    policy = problem.policy
    assert (policy.prefill_token_budget, policy.prefill_max_batch) == (512, 8)
    assert (policy.decode_max_batch, policy.block_size) == (24, 16)
    assert (problem.search.max_tp, problem.search.max_pp, problem.search.requests) == (1, 1, 60)


def test_planning_cluster_wins_over_the_detected_size(model_dir: Path) -> None:
    planning = {"workload": WORKLOAD, "cluster": {"nodes": 2, "devices_per_node": 3}}
    problem = planning_problem(parse_spec(auto(model_dir, planning=planning)), SIZE)
    assert (problem.cluster.nodes, problem.cluster.devices_per_node) == (2, 3)
    expect("planning.cluster", "required", data=auto(model_dir), size=None)


def test_auto_dtype_follows_the_engine(model_dir: Path) -> None:
    model = {"path": str(model_dir), "dtype": "auto"}
    assert planning_problem(parse_spec(auto(model_dir, model=model)), SIZE).dtype == "fp32"
    (model_dir / "config.json").write_text(json.dumps({**CONFIG, "torch_dtype": "float16"}))
    assert planning_problem(parse_spec(auto(model_dir, model=model)), SIZE).dtype == "bf16"


def test_hardware_calibration_policy_and_search_pass_through(model_dir: Path, tmp_path: Path) -> None:
    fit = PhaseFit(coef=(0.002, 1e-5, 0.0), rms=0.0, samples=4)
    save_profile(CalibratedProfile(entries=(CalibratedEntry(1, 1, fit, fit),)),
                 tmp_path / "calib.json")
    planning = {"workload": WORKLOAD, "hardware": {"base": "cpu", "memory_gib": 2},
                "calibration": "calib.json", "policy": {"watermark": 0.05},
                "search": {"requests": 50, "seed": 7}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(auto(model_dir, planning=planning)))
    spec = load_spec(path)
    assert spec.planning is not None and spec.planning.calibration == str(tmp_path / "calib.json")
    problem = planning_problem(spec, SIZE)
    assert problem.hardware.name == "cpu-custom" and problem.hardware.memory_bytes == 2 * 1024**3
    assert problem.calibration is not None and problem.calibration.entry(1, 1) is not None
    assert problem.policy.watermark == 0.05 and problem.policy.decode_max_batch == 24
    assert (problem.search.requests, problem.search.seed) == (50, 7)


def test_cluster_size_from_ray_nodes_and_from_this_host(model_dir: Path, monkeypatch) -> None:
    spec = parse_spec(auto(model_dir))  # both pools: num_cpus 0.5
    assert cluster_from_nodes(spec, [{"CPU": 4.0}]) == PlanningCluster(1, 8)
    # Identical nodes are modelled: the smallest bounds them; nodes without CPUs do not count.
    nodes = [{"CPU": 4.0}, {"CPU": 3.0, "memory": 1e9}, {"GPU": 1.0}]
    assert cluster_from_nodes(spec, nodes) == PlanningCluster(2, 6)
    hungry = parse_spec(auto(model_dir, prefill={"num_cpus": 2}))
    assert cluster_from_nodes(hungry, [{"CPU": 5.0}]) == PlanningCluster(1, 2)
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    assert host_cluster(spec) == PlanningCluster(1, 6)
    with pytest.raises(SpecError, match=r"^planning.cluster: no Ray node has the 2 CPU"):
        cluster_from_nodes(hungry, [{"CPU": 1.0}])


# --- errors name the field --------------------------------------------------------------------

def test_auto_needs_slo_and_explicit_refuses_planning(model_dir: Path) -> None:
    with pytest.raises(SpecError, match=r"^slo: required when placement is auto"):
        parse_spec(auto(model_dir, slo=None))
    with pytest.raises(SpecError, match=r"^planning: only allowed when placement is auto"):
        parse_spec(auto(model_dir, placement="explicit"))
    explicit = parse_spec(auto(model_dir, placement="explicit", planning=None))
    with pytest.raises(SpecError, match=r"^placement: is explicit: nothing to plan"):
        check_plannable(explicit)


@pytest.mark.parametrize("planning, field, fragment", [
    ({"workload": {**WORKLOAD, "colour": "red"}}, "planning.workload.colour", "unknown field"),
    ({"workload": {**WORKLOAD, "rate": 0}}, "planning.workload.rate", "must be > 0"),
    ({"workload": {"rate": 1}}, "planning.workload.input_len", "required"),
    ({"search": {"requests": 60}}, "planning.workload", "required to plan"),
    ({"workload": WORKLOAD, "hardware": "tpu-v9"}, "planning.hardware", "unknown hardware profile"),
    ({"workload": WORKLOAD, "calibration": "missing.json"}, "planning.calibration", "cannot read"),
    ({"workload": WORKLOAD, "policy": {"block_size": 32}}, "planning.policy.block_size",
     "set by prefill.block_size (16)"),
    ({"workload": WORKLOAD, "search": {"requests": 10}}, "planning.search.requests", ">= 50"),
    ({"workload": WORKLOAD, "cluster": {"nodes": 0, "devices_per_node": 2}},
     "planning.cluster.nodes", ">= 1"),
    ({"workload": WORKLOAD, "clusters": {}}, "planning.clusters", "unknown field"),
])
def test_planning_errors_name_the_field(model_dir: Path, planning: dict, field: str,
                                        fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(auto(model_dir, planning=planning))  # caught when the spec loads
    assert info.value.field == field and fragment in str(info.value), str(info.value)


def test_load_spec_points_at_the_planning_line(model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(auto(model_dir, planning={"workload": {**WORKLOAD, "colour": 1}}),
                                   sort_keys=False))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "colour" in text)
    with pytest.raises(SpecError, match=rf"^planning.workload.colour: unknown field \(at {path}:{line}\)"):
        load_spec(path)


@pytest.mark.parametrize("changes, field, fragment", [
    ({"decode": {"replicas": 2}}, "decode.replicas", "cannot be pinned under placement: auto"),
    ({"prefill": {"tp": 2}}, "prefill.tp", "cannot be pinned under placement: auto"),
    ({"decode": {"device": "cuda"}}, "decode.device", "must equal prefill.device"),
    ({"prefill": {"device": "cuda"}, "decode": {"device": "cuda"}}, "planning.hardware",
     "required for cuda pools"),
    ({"decode": {"num_blocks": 4}}, "decode.num_blocks", "cannot hold the workload's longest decode"),
])
def test_unplannable_pools_name_the_field(model_dir: Path, changes: dict, field: str,
                                          fragment: str) -> None:
    data = auto(model_dir, **changes)
    with pytest.raises(SpecError) as info:
        plan_spec(parse_spec(data), SIZE)
    assert info.value.field == field and fragment in str(info.value), str(info.value)


def test_impossible_slo_surfaces_the_planners_explanation(model_dir: Path) -> None:
    error = expect("placement", "auto placement found no feasible deployment",
                   "SLO unreachable at any rate", "TTFT 0.01 ms",
                   data=auto(model_dir, slo={"ttft_ms": 0.01, "tpot_ms": 100}))
    assert "Traceback" not in str(error)


def test_model_not_on_this_machine(tmp_path: Path) -> None:
    data = auto(tmp_path / "absent", model={"name": "no-such-model"})
    spec = parse_spec(data)  # loads: the model may live on the cluster, not here
    assert not spec.model_check.checked
    expect("model", "the planner needs the model's config.json", spec=spec)


# --- the plan -----------------------------------------------------------------------------------

def test_plan_is_single_device_and_keeps_the_pools_fixed_fields(model_dir: Path) -> None:
    spec = parse_spec(auto(model_dir))
    planned = plan_spec(spec, SIZE)
    result = planned.result
    # Unrestricted, tp=2 / pp=2 shapes would be legal here and show up among the runners-up.
    for plan in (result.plan, *result.alternatives):
        assert (plan.prefill.tp, plan.prefill.pp, plan.decode.tp, plan.decode.pp) == (1, 1, 1, 1)
    assert result.plan.devices <= SIZE.nodes * SIZE.devices_per_node
    out = planned.spec
    assert out.placement == "explicit" and out.planning is None and not out.needs_planning
    assert (out.prefill.replicas, out.decode.replicas) == (result.plan.prefill.replicas,
                                                           result.plan.decode.replicas)
    for name in ("prefill", "decode"):
        before, after = getattr(spec, name), getattr(out, name)
        assert msgspec.structs.replace(after, replicas=None, tp=None, pp=None) == before
    assert (out.model, out.slo, out.transfer, out.router) == (spec.model, spec.slo, spec.transfer,
                                                              spec.router)
    assert fill_spec(spec, result.plan) == out
    line = summary(spec.name, result)
    assert line.startswith("planned auto: prefill ") and "predicted goodput" in line
    assert "attainment" in line and "\n" not in line


def test_search_limits_let_the_planner_choose_parallel_instances_that_launch(model_dir: Path) -> None:
    from tandem.cluster.deployment import launch_config

    data = auto(model_dir)
    # Too little memory per device for the weights and KV of fewer than four: only tp=2, pp=2 fits.
    data["planning"]["hardware"] = {"base": "cpu", "memory_gib": 0.001}
    eight = PlanningCluster(nodes=1, devices_per_node=8)  # one 4-device instance per phase
    with pytest.raises(SpecError, match="placement: auto placement found no feasible deployment"):
        plan_spec(parse_spec(data), eight)  # CPU pools: tp = pp = 1 unless allowed
    data["planning"]["search"].update(max_tp=2, max_pp=2)
    planned = plan_spec(parse_spec(data), eight)
    plan = planned.result.plan
    assert plan.prefill.tp * plan.prefill.pp > 1 and plan.decode.tp * plan.decode.pp > 1
    config = launch_config(planned.spec, str(model_dir))
    for group, phase in ((config.prefill, plan.prefill), (config.decode, plan.decode)):
        par = group.engine.parallelism
        assert (par.tp, par.pp) == (phase.tp, phase.pp) and group.workers == phase.tp * phase.pp
        # The plan put each instance on the one node: the launch insists on it.
        assert group.one_node and group.strategy == "STRICT_PACK"
    # A plan whose decode instance spans two nodes (one stage on each) launches with PACK.
    from tandem.placement.plan import InstancePlacement, StagePlacement

    across = InstancePlacement((StagePlacement(0, (0,)), StagePlacement(1, (0,))))
    two_nodes = msgspec.structs.replace(plan, decode=msgspec.structs.replace(plan.decode, tp=1, pp=2,
                                                                             instances=(across,)))
    filled = fill_spec(parse_spec(data), two_nodes)
    assert filled.prefill.one_node and not filled.decode.one_node


def test_plan_is_not_hard_coded(model_dir: Path) -> None:
    # More traffic on the same devices needs more instances.
    light = plan_spec(parse_spec(auto(model_dir)), SIZE).result.plan
    heavy_data = auto(model_dir)
    heavy_data["planning"]["workload"]["rate"] = 30
    heavy = plan_spec(parse_spec(heavy_data), PlanningCluster(1, 12)).result.plan
    assert heavy.prefill.replicas + heavy.decode.replicas > light.prefill.replicas + light.decode.replicas


def test_example_auto_spec_plans() -> None:
    spec = load_spec(Path(__file__).resolve().parents[2] / "deploy/specs/auto-placement.yaml")
    if not spec.model_check.checked:
        pytest.skip(f"smollm2 is not prepared here: {spec.model_check.skipped_reason}")
    planned = plan_spec(spec)  # the example gives planning.cluster
    assert planned.result.plan.meets_target and planned.result.plan.cluster_devices == 2
    assert planned.spec.placement == "explicit" and not planned.spec.needs_planning


# --- tandem plan CLUSTER_SPEC --write-spec ------------------------------------------------------

def test_write_spec_round_trips(model_dir: Path, tmp_path: Path, capsys) -> None:
    source = tmp_path / "auto.yaml"
    source.write_text(yaml.safe_dump(auto(model_dir, planning={
        "workload": WORKLOAD, "cluster": {"nodes": 1, "devices_per_node": 6},
        "search": {"requests": 60}})))
    out = tmp_path / "planned.yaml"
    assert main(["plan", str(source), "--write-spec", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prefill:" in printed and f"wrote {out}" in printed and "planned auto:" in printed
    written = load_spec(out)
    expected = plan_spec(load_spec(source)).spec  # planning.cluster sizes it: no host dependence
    assert written == expected
    assert written.placement == "explicit" and not written.needs_planning
    assert parse_spec(spec_to_dict(written)) == written
    assert out.read_text().startswith("# Written by `tandem plan")
    # JSON output stays parseable: the note about the written file goes to stderr.
    assert main(["plan", str(source), "--json", "--write-spec", str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["plan"]["decode"]["tp"] == 1 and "wrote" in captured.err


def test_plan_command_errors(model_dir: Path, tmp_path: Path, capsys) -> None:
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text(yaml.safe_dump(auto(model_dir, placement="explicit", planning=None)))
    assert main(["plan", str(explicit)]) == 2
    assert "placement: is explicit: nothing to plan" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(auto(model_dir, planning={"workload": {**WORKLOAD, "x": 1}})))
    assert main(["plan", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "planning.workload.x: unknown field" in err and len(err.strip().splitlines()) == 1
    placement_spec = tmp_path / "placement.yaml"
    placement_spec.write_text(yaml.safe_dump({
        "model": str(model_dir), "hardware": "cpu", "cluster": {"nodes": 1, "devices_per_node": 2},
        "slo": {"ttft_ms": 1000, "tpot_ms": 100}, "workload": WORKLOAD, "search": {"requests": 60}}))
    assert main(["plan", str(placement_spec), "--write-spec", str(tmp_path / "o.yaml")]) == 2
    assert "--write-spec: needs a cluster spec" in capsys.readouterr().err


def test_simulate_accepts_an_auto_cluster_spec(model_dir: Path, tmp_path: Path, capsys) -> None:
    source = tmp_path / "auto.yaml"
    source.write_text(yaml.safe_dump(auto(model_dir, planning={
        "workload": WORKLOAD, "cluster": {"nodes": 1, "devices_per_node": 4},
        "search": {"requests": 60}})))
    assert main(["simulate", str(source), "--rate", "1", "--prefill", "1:1:1",
                 "--decode", "1:1:1"]) == 0
    assert "1 prefill x (tp=1, pp=1) + 1 decode x (tp=1, pp=1)" in capsys.readouterr().out
