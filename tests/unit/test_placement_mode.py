"""The planner's choice between disaggregated and colocated deployments (placement/search.py
``choose_mode``, placement/results.py ``baseline``), on synthetic calibrated step times where each
mode should win, and the explicit spec ``placement: auto`` then launches (cluster/autoplace.py)."""
from __future__ import annotations

from pathlib import Path

import msgspec

from tandem.cluster.autoplace import plan_spec, summary
from tandem.cluster.spec import parse_spec
from tandem.placement.calibrate import CalibratedEntry, CalibratedProfile, PhaseFit, save_profile
from tandem.placement.problem import problem_from_dict
from tandem.placement.search import search

# Decode bound by a fixed per-step cost and a batch cap of 8, prompts nearly free: a colocated
# instance decodes as much as a decode-only one and prefills on the side, so two colocated
# instances serve about twice what one prefill + one decode instance does.
DECODE_BOUND = {"prefill": (0.004, 2e-5, 0.0), "decode": (0.030, 1e-4, 0.0)}
# Prompts cost 1 ms a token and TPOT is tight: any step carrying prompt tokens misses it (a whole
# prompt stalls the decodes ~260 ms, even a 16-token chunk makes a 26 ms step), so only
# decode-only instances can meet it.
PREFILL_HEAVY = {"prefill": (0.010, 1e-3, 0.0), "decode": (0.010, 1e-4, 0.0)}


def _profile(tmp_path: Path, forms: dict) -> str:
    fits = {phase: PhaseFit(coef, 0.0, 10) for phase, coef in forms.items()}
    path = tmp_path / "profile.json"
    save_profile(CalibratedProfile(entries=(CalibratedEntry(1, 1, **fits),)), path)
    return str(path)


def _problem(calibration: str, tpot_ms: float):
    return problem_from_dict({
        "model": "opt-13b", "hardware": "A100-80GB", "calibration": calibration,
        "cluster": {"nodes": 1, "devices_per_node": 2}, "slo": {"ttft_ms": 2000, "tpot_ms": tpot_ms},
        "workload": {"input_len": 256, "output_len": 32},
        "policy": {"decode_max_batch": 8}, "search": {"requests": 200, "max_tp": 1, "max_pp": 1}})


def test_colocated_wins_when_decode_is_the_bottleneck_and_prompts_are_cheap(tmp_path: Path) -> None:
    result = search(_problem(_profile(tmp_path, DECODE_BOUND), tpot_ms=50))
    b = result.baseline
    assert result.mode == "colocated" and b is not None
    assert b.goodput_per_device > 1.3 * result.plan.goodput_per_device
    assert b.replicas == 2 and b.devices == 2


def test_disaggregated_wins_when_prompt_tokens_break_the_tpot_target(tmp_path: Path) -> None:
    result = search(_problem(_profile(tmp_path, PREFILL_HEAVY), tpot_ms=15))
    assert result.mode == "disaggregated" and result.plan.goodput > 0
    assert result.baseline is not None and result.baseline.goodput < result.plan.goodput


def test_chunked_prefill_beats_whole_prompts_where_prompts_would_stall_decodes(tmp_path: Path) -> None:
    """Moderate prompts (0.25 ms a token) against a 60 ms TPOT: a whole 256-token prompt makes a
    ~100 ms step, chunks of what fits beside the decodes keep every step under the target."""
    forms = {"prefill": (0.010, 2.5e-4, 0.0), "decode": (0.030, 1e-4, 0.0)}
    result = search(_problem(_profile(tmp_path, forms), tpot_ms=60))
    b = result.baseline
    assert b is not None and b.chunked_prefill and 0 < b.token_budget < 256
    assert b.max_batch <= b.token_budget


def _auto_spec(model_dir: Path, calibration: str, allow_colocated: bool = True):
    return parse_spec({
        "name": "mode", "placement": "auto", "model": {"path": str(model_dir), "dtype": "float32"},
        "prefill": {"device": "cpu"}, "decode": {"device": "cpu", "max_num_seqs": 8, "num_cpus": 1},
        "slo": {"ttft_ms": 2000, "tpot_ms": 50},
        "planning": {"calibration": calibration, "cluster": {"nodes": 1, "devices_per_node": 2},
                     "workload": {"input_len": 64, "output_len": 32}, "search": {"requests": 200},
                     "allow_colocated": allow_colocated}})


def test_placement_auto_launches_the_colocated_instances_it_chose(tmp_path: Path, tiny_llama_dir: Path) -> None:
    calibration = _profile(tmp_path, DECODE_BOUND)
    planned = plan_spec(_auto_spec(tiny_llama_dir, calibration))
    spec, chosen = planned.spec, planned.result.baseline
    assert planned.result.mode == "colocated" and chosen is not None
    assert spec.mode == "colocated" and spec.placement == "explicit" and spec.planning is None
    pool = spec.instances
    assert pool is not None and (pool.replicas, pool.tp, pool.pp) == (chosen.replicas, 1, 1)
    assert pool.chunked_prefill == chosen.chunked_prefill and pool.max_num_seqs <= pool.max_batch_tokens
    line = summary("mode", planned.result)
    assert "mode: colocated" in line and "best disaggregated plan" in line
    pinned = plan_spec(_auto_spec(tiny_llama_dir, calibration, allow_colocated=False))
    assert pinned.spec.mode == "disaggregated" and pinned.result.mode == "disaggregated"
    assert msgspec.structs.asdict(pinned.spec)["instances"] is None
