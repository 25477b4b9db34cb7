"""`tandem plan` and `tandem simulate` through deploy.cli.main."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tandem.deploy.cli import main

SPEC = {
    "model": "llama-2-7b", "hardware": "A100-80GB", "cluster": {"nodes": 1, "devices_per_node": 4},
    "slo": {"ttft_ms": 200, "tpot_ms": 60, "attainment": 0.9},
    "workload": {"rate": 20, "input_len": {"dist": "uniform", "low": 32, "high": 512},
                 "output_len": {"dist": "uniform", "low": 8, "high": 128}},
    "search": {"requests": 200, "max_requests": 1200, "alternatives": 2},
}


def _write(tmp_path: Path, **changes: object) -> str:
    data = {**SPEC, **changes}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_plan_prints_plan_alternatives_and_baseline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", _write(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "prefill:" in out and "decode:" in out and "target rate 20 req/s: plan meets it" in out
    assert "plan and top alternatives:" in out and "per device" in out
    table = out.split("plan and top alternatives:")[1].split("colocated baseline")[0]
    assert len([line for line in table.splitlines() if line.startswith(("high", "low"))]) >= 2
    assert "colocated baseline:" in out and "req/s per device" in out


def test_plan_json_is_a_search_result(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", _write(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    plan = data["plan"]
    assert plan["meets_target"] and plan["goodput"] >= 20
    assert plan["prefill"]["replicas"] == len(plan["prefill"]["instances"])
    assert plan["devices"] == (plan["prefill"]["tp"] * plan["prefill"]["pp"] * plan["prefill"]["replicas"]
                               + plan["decode"]["tp"] * plan["decode"]["pp"] * plan["decode"]["replicas"])
    assert data["baseline"]["goodput_per_device"] > 0 and data["exact"] is True


def test_simulate_given_deployment(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = _write(tmp_path)
    assert main(["simulate", spec, "--rate", "5", "--prefill", "1:1:1", "--decode", "1:1:2"]) == 0
    out = capsys.readouterr().out
    assert "1 prefill x (tp=1, pp=1) + 2 decode x (tp=1, pp=1) on 3 devices" in out
    assert "attainment" in out and "TPOT mean/p50/p90/p99 ms" in out
    assert main(["simulate", spec, "--rate", "5", "--colocated", "2:1:1", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert runs[0]["deployment"].startswith("colocated: 1 x (tp=2")
    assert len(runs[0]["result"]["ttft"]) == len(runs[0]["result"]["tpot"]) > 100


def test_simulate_searched_plan_and_baseline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["simulate", _write(tmp_path), "--rate", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("planned (high-affinity)") and "colocated baseline:" in out


@pytest.mark.parametrize("argv, changes, message", [
    (["plan"], {"slo": {"ttft_ms": 0, "tpot_ms": 60}}, "slo.ttft_ms: must be > 0"),
    (["plan"], {"slos": {}}, "slos: unknown field"),
    (["plan"], {"model": "opt-175b", "hardware": "A100-40GB"}, "opt-175b needs 325.2 GiB"),
    (["plan"], {"slo": {"ttft_ms": 1, "tpot_ms": 60}}, "SLO unreachable at any rate"),
    (["simulate", "--rate", "0"], {}, "--rate: must be > 0"),
    (["simulate", "--rate", "1", "--prefill", "2x1"], {}, "--prefill: expected TP:PP:N"),
    (["simulate", "--rate", "1", "--prefill", "3:1:1", "--decode", "1:1:1"], {},
     "--prefill: tp=3 does not divide the 32 attention heads"),
    (["simulate", "--rate", "1", "--prefill", "1:1:1"], {}, "give both --prefill and --decode"),
    (["simulate", "--rate", "1", "--prefill", "2:1:2", "--decode", "1:1:1"], {}, "do not fit"),
])
def test_user_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          argv: list[str], changes: dict, message: str) -> None:
    command, *rest = argv
    assert main([command, _write(tmp_path, **changes), *rest]) == 2
    err = capsys.readouterr().err
    assert f"tandem {command}: error:" in err and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_spec_file(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "/nonexistent/spec.yaml"]) == 2
    assert "No such file" in capsys.readouterr().err


def test_simulate_plots_its_prediction_beside_a_bench_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`tandem simulate --rates ... --plot DIR --measured results.json`: one simulated curve per
    deployment and the bench's measured one, on the axes `tandem bench` draws."""
    from matplotlib.image import imread

    bench = tmp_path / "bench-run"
    bench.mkdir()
    (bench / "results.json").write_text(json.dumps({"rows": [{"rate": 2.0, "attainment": 1.0},
                                                             {"rate": 8.0, "attainment": 0.4}]}))
    spec, out = _write(tmp_path), tmp_path / "plots"
    argv = ["simulate", spec, "--rates", "2", "8", "--prefill", "1:1:1", "--decode", "1:1:1",
            "--plot", str(out), "--measured", str(bench / "results.json"), "--json"]
    assert main(argv) == 0
    runs = json.loads(capsys.readouterr().out.splitlines()[0])
    assert [r["result"]["rate"] for r in runs] == [2.0, 8.0]
    assert runs[0]["result"]["attainment"] >= runs[1]["result"]["attainment"]  # more load, no better
    image = imread(out / "simulated_attainment.png")
    assert image.shape[0] >= 300 and image.shape[1] >= 500 and image.std() > 0.01  # drawn, not blank
    (bench / "bad.json").write_text("{}")
    assert main(["simulate", spec, "--rates", "2", "--plot", str(out), "--measured", str(bench / "bad.json")]) == 2
    assert "--measured: " in capsys.readouterr().err
    assert main(["simulate", spec, "--rates", "2", "--measured", str(bench / "results.json")]) == 2
    assert "--measured: needs --plot" in capsys.readouterr().err
