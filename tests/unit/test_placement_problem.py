"""Placement spec parsing: every error names its field; examples and embedded use work."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tandem.placement.problem import SpecError, load_problem, problem_from_dict
from tandem.placement.workload import Fixed, LogNormal, Uniform, sample_base

EXAMPLES = sorted(Path("placement/examples").glob("*.yaml"))
BASE = {
    "model": "opt-13b", "dtype": "fp16", "hardware": "A100-80GB",
    "cluster": {"nodes": 1, "devices_per_node": 8},
    "slo": {"ttft_ms": 250, "tpot_ms": 100, "attainment": 0.9},
    "workload": {"rate": 5, "input_len": {"dist": "uniform", "low": 16, "high": 512},
                 "output_len": 64},
}


def _with(path: str, value: object) -> dict:
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return data


_DELETE = object()


def test_examples_parse() -> None:
    assert len(EXAMPLES) >= 2
    for path in EXAMPLES:
        problem = load_problem(path)
        assert problem.cluster.devices >= 8 and problem.slo.attainment == 0.9


def test_base_spec_resolves_everything() -> None:
    p = problem_from_dict(BASE)
    assert p.model.name == "opt-13b" and p.dtype == "fp16" and p.hardware.name == "A100-80GB"
    assert p.slo.ttft_s == 0.25 and p.workload.rate == 5
    assert p.workload.output_len == Fixed(64) and p.workload.input_len == Uniform(16, 512)
    assert p.workload.arrival.process == "poisson"


@pytest.mark.parametrize("path, value, message", [
    ("slo.ttft_ms", 0, "slo.ttft_ms: must be > 0"),
    ("slo.tpot_ms", -5, "slo.tpot_ms: must be > 0"),
    ("slo.attainment", 1.5, "slo.attainment: must be <= 1"),
    ("slo.p99", 1, "slo.p99: unknown field"),
    ("colour", "red", "colour: unknown field"),
    ("cluster", _DELETE, "cluster: required"),
    ("cluster.nodes", "two", "cluster.nodes: expected int, got str"),
    ("cluster.devices_per_node", 0, "cluster.devices_per_node: must be >= 1"),
    ("workload.rate", 0, "workload.rate: must be > 0"),
    ("workload.input_len", {"dist": "zipf"}, "workload.input_len.dist: invalid value 'zipf'"),
    ("workload.input_len", {"dist": "uniform", "low": 50, "high": 10},
     "workload.input_len.high: must be >= low"),
    ("workload.input_len", {"dist": "lognormal", "mean": 0, "sigma": 1},
     "workload.input_len.mean: must be > 0"),
    ("workload.output_len", _DELETE, "workload.output_len: required"),
    ("workload.arrival", {"process": "poisson", "cv": 3}, "workload.arrival.cv: only a gamma"),
    ("workload.arrival", "uniform", "workload.arrival"),
    ("workload.trace", "trace.jsonl", "workload.trace: give either"),
    ("hardware", "TPU-v9", "hardware: unknown hardware profile 'TPU-v9'"),
    ("hardware", {"tflops": {"fp16": 100}}, "hardware.memory_gib: required"),
    ("hardware", {"base": "A100-80GB", "mem_bw_gb_s": -1}, "hardware.mem_bw_gb_s: must be > 0"),
    ("dtype", "fp8", "dtype: dtype fp8 not supported by hardware A100-80GB"),
    ("dtype", "fp4", "dtype: unknown dtype"),
    ("model", "gpt-17", "model: 'gpt-17' is neither"),
    ("policy", {"decode_max_batch": 0}, "policy.decode_max_batch: must be >= 1"),
    ("search", {"algorithm": "greedy"}, "search.algorithm: invalid enum value 'greedy'"),
    ("calibration", "missing.json", "calibration: cannot read"),
])
def test_errors_name_the_field(path: str, value: object, message: str) -> None:
    with pytest.raises(SpecError) as info:
        problem_from_dict(_with(path, value))
    assert str(info.value).startswith(message), str(info.value)


def test_embedded_sections_prefix_their_errors() -> None:
    with pytest.raises(SpecError, match=r"^placement\.slo\.ttft_ms: must be > 0"):
        problem_from_dict(_with("slo.ttft_ms", 0), where="placement")
    with pytest.raises(SpecError, match="spec: expected a mapping"):
        problem_from_dict(["not", "a", "mapping"])


def test_trace_workload(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text('{"input_len": 100, "output_len": 20}\n\n'
                                      '{"input_len": 3000, "output_len": 50}\n')
    data = _with("workload", {"trace": "t.jsonl", "arrival": {"process": "gamma", "cv": 2}})
    problem = problem_from_dict(data, base_dir=tmp_path)
    assert problem.workload.trace == ((100, 20), (3000, 50))
    # OPT's context is 2048: the long prompt is cut, and its output cut to what fits after it.
    trace = sample_base(problem.workload, 200, seed=1, max_positions=2048)
    assert set(zip(trace.inputs, trace.outputs)) == {(100, 20), (2047, 1)}
    assert problem.workload.max_lengths(2048) == (2047, 1)
    (tmp_path / "bad.jsonl").write_text('{"input_len": 1, "output_len": 2}\n{"input": 5}\n')
    with pytest.raises(SpecError, match=r"workload.trace: .*bad.jsonl:2: expected"):
        problem_from_dict(_with("workload", {"trace": "bad.jsonl"}), base_dir=tmp_path)


def test_yaml_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_problem(tmp_path / "bad.yaml")
    with pytest.raises(SpecError, match="No such file"):
        load_problem(tmp_path / "absent.yaml")


def test_gamma_arrivals_are_burstier_with_the_same_mean() -> None:
    data = _with("workload.arrival", {"process": "gamma", "cv": 3.0})
    data["workload"]["input_len"] = {"dist": "lognormal", "mean": 200, "sigma": 1.0, "max": 1000}
    workload = problem_from_dict(data).workload
    assert isinstance(workload.input_len, LogNormal)
    bursty = sample_base(workload, 20_000, seed=3, max_positions=2048)
    gaps = [b - a for a, b in zip((0.0,) + bursty.times, bursty.times)]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert mean == pytest.approx(1.0, rel=0.05) and cv == pytest.approx(3.0, rel=0.1)
    assert max(bursty.inputs) <= 1000 and min(bursty.inputs) >= 1
