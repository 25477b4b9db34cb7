"""The search: memory and divisibility pruning, monotonicity, both algorithms, clear failures."""
from __future__ import annotations

import itertools

import pytest

from tandem.placement.candidates import (Shape, divisibility_error, kv_is_local, legal_shapes,
                                         pack_high_affinity, required_kv_blocks)
from tandem.placement.goodput import find_goodput
from tandem.placement.memory import instance_memory
from tandem.placement.problem import Cluster, problem_from_dict
from tandem.placement.search import PlacementError, search
from tandem.placement.sim_core import Percentiles, SimResult


def spec(ttft: float = 200, tpot: float = 60, nodes: int = 1, dpn: int = 4,
         rate: float | None = None, model: str = "llama-2-7b", hardware: object = "A100-80GB",
         **search_opts: object) -> dict:
    data: dict = {
        "model": model, "hardware": hardware, "cluster": {"nodes": nodes, "devices_per_node": dpn},
        "slo": {"ttft_ms": ttft, "tpot_ms": tpot},
        "workload": {"input_len": {"dist": "uniform", "low": 32, "high": 512},
                     "output_len": {"dist": "uniform", "low": 8, "high": 128}},
        "search": {"requests": 200, "max_requests": 1200, "alternatives": 1, **search_opts},
    }
    if rate is not None:
        data["workload"]["rate"] = rate
    return data


def goodput(data: dict) -> float:
    """The plan's goodput; 0 when the search proves the SLO unreachable."""
    try:
        result = search(problem_from_dict(data))
    except PlacementError as exc:
        assert "unreachable" in str(exc)
        return 0.0
    assert result.exact  # the branch and bound finished: the value is the optimum
    return result.plan.goodput


def test_tightening_an_slo_never_raises_goodput() -> None:
    ttft = [goodput(spec(ttft=t)) for t in (400, 120, 60, 35, 5)]
    assert all(a >= b for a, b in zip(ttft, ttft[1:])), ttft
    assert ttft[0] > ttft[3] > 0 and ttft[-1] == 0.0  # the sweep crosses binding values
    tpot = [goodput(spec(ttft=120, tpot=t)) for t in (100, 25, 20, 16)]
    assert all(a >= b for a, b in zip(tpot, tpot[1:])), tpot
    assert tpot[0] > tpot[-1]


def test_adding_devices_never_lowers_goodput() -> None:
    by_nodes = [goodput(spec(ttft=60, nodes=n, dpn=2)) for n in (1, 2, 3)]
    assert by_nodes[0] < by_nodes[1] < by_nodes[2], by_nodes
    by_width = [goodput(spec(ttft=60, dpn=d)) for d in (2, 4, 8)]
    assert all(a <= b for a, b in zip(by_width, by_width[1:])), by_width


def test_target_rate_sizes_the_deployment() -> None:
    small = search(problem_from_dict(spec(rate=10))).plan
    assert small.meets_target and small.goodput >= 10 and small.rate == 10
    assert small.devices < 4 and small.attainment >= 0.9
    too_much = search(problem_from_dict(spec(rate=10_000))).plan
    assert not too_much.meets_target and too_much.rate == pytest.approx(too_much.goodput)


def _fits(problem, tp: int, pp: int, phase: str) -> bool:  # type: ignore[no-untyped-def]
    mem = instance_memory(problem.model, problem.hardware, problem.dtype, tp, pp, problem.policy)
    kv_need = required_kv_blocks(problem, phase) * problem.policy.block_size  # type: ignore[arg-type]
    return mem.weight_bytes + mem.workspace_bytes + kv_need * (
        problem.model.kv_bytes_per_token(problem.dtype) / (tp * pp)) <= mem.usable_bytes


@pytest.mark.parametrize("model, nodes", [("opt-66b", 1), ("llama-2-70b", 1)])
def test_plans_fit_device_memory(model: str, nodes: int) -> None:
    problem = problem_from_dict(spec(ttft=3000, tpot=200, nodes=nodes, dpn=8, model=model))
    for phase in ("prefill", "decode"):
        legal = set(legal_shapes(problem, phase))
        for tp, pp in itertools.product(range(1, 9), range(1, 9)):
            if Shape(tp, pp) in legal:
                assert _fits(problem, tp, pp, phase)
                assert divisibility_error(problem.model, tp, pp) is None
    result = search(problem)
    for plan in (result.plan, *result.alternatives):
        assert _fits(problem, plan.prefill.tp, plan.prefill.pp, "prefill")
        assert _fits(problem, plan.decode.tp, plan.decode.pp, "decode")
        assert plan.prefill.tp * plan.prefill.pp > 1  # 66-70B of weights never fit one GPU
        assert plan.devices <= problem.cluster.devices


def test_model_too_big_gets_an_explanation() -> None:
    with pytest.raises(PlacementError) as info:
        search(problem_from_dict(spec(model="opt-175b", hardware="A100-40GB", dpn=2)))
    message = str(info.value)
    assert "opt-175b needs 325.2 GiB of fp16 weights" in message
    assert "largest instance this cluster allows (tp=2, pp=1" in message


def test_divisibility_rules() -> None:
    problem = problem_from_dict(spec(model="opt-66b", dpn=8, ttft=3000, tpot=200))
    tps = {s.tp for s in legal_shapes(problem, "decode")}
    pps = {s.pp for s in legal_shapes(problem, "decode")}
    assert tps == {1, 2, 3, 4, 6, 8}  # 72 heads: tp 3 and 6 work, 5 and 7 do not
    assert Shape(1, 1) not in legal_shapes(problem, "decode")  # but one GPU cannot hold 132 GB
    assert all(64 % p == 0 for p in pps)
    llama3 = problem_from_dict(spec(model="llama-3-8b", dpn=8))
    assert {s.tp for s in legal_shapes(llama3, "decode")} == {1, 2, 4, 8}
    assert divisibility_error(llama3.model, 3, 1) == "tp=3 does not divide the 32 attention heads"
    assert divisibility_error(problem.model, 6, 3) == "pp=3 does not divide the 64 layers"
    gqa = problem_from_dict(spec(model="llama-2-70b", dpn=8))  # 64 heads, 8 KV heads
    assert "KV heads" in (divisibility_error(gqa.model, 16, 1) or "")


def test_max_tp_and_max_pp_bound_the_shapes_and_the_plan() -> None:
    free = problem_from_dict(spec(model="llama-3-8b", dpn=8))
    assert max(s.tp for s in legal_shapes(free, "decode")) == 8  # no limit by default
    capped = problem_from_dict(spec(model="llama-3-8b", dpn=8, max_tp=2, max_pp=1))
    assert {(s.tp, s.pp) for s in legal_shapes(capped, "decode")} == {(1, 1), (2, 1)}
    single = problem_from_dict(spec(model="llama-2-7b", dpn=4, rate=20, max_tp=1, max_pp=1))
    result = search(single)
    for plan in (result.plan, *result.alternatives):
        assert (plan.prefill.tp, plan.prefill.pp, plan.decode.tp, plan.decode.pp) == (1, 1, 1, 1)
    # One A100-40GB cannot hold opt-66b: with tp capped at 1 the explanation says so.
    with pytest.raises(PlacementError, match=r"largest instance this cluster allows \(tp=1, pp=1"):
        search(problem_from_dict(spec(model="opt-66b", hardware="A100-40GB", max_tp=1, max_pp=1)))


def test_unreachable_slo_is_explained() -> None:
    with pytest.raises(PlacementError, match="SLO unreachable at any rate: even idle, a mean-length"):
        search(problem_from_dict(spec(ttft=2)))


def test_slow_links_choose_low_affinity_and_keep_kv_on_node() -> None:
    slow = {"base": "A100-80GB", "inter_node_gb_s": 0.5}
    result = search(problem_from_dict(spec(nodes=2, dpn=4, hardware=slow)))
    plan = result.plan
    assert plan.algorithm == "low-affinity"
    assert len(plan.decode_affinity) == plan.prefill.replicas
    for src, targets in zip(plan.prefill.instances, plan.decode_affinity):
        assert targets  # every prefill instance has a decode instance on its own node(s)
        for j in targets:
            assert kv_is_local(src, plan.decode.instances[j], 32)
    fast = search(problem_from_dict(spec(nodes=2, dpn=4))).plan
    assert fast.algorithm == "high-affinity" and fast.decode_affinity == ()


def test_high_affinity_packing_respects_nodes() -> None:
    cluster = Cluster(nodes=2, devices_per_node=4)
    placed = pack_high_affinity(cluster, Shape(2, 1), 2, Shape(1, 1), 4)
    assert placed is not None
    used = [(s.node, d) for inst in placed[0] + placed[1] for s in inst.stages for d in s.devices]
    assert len(used) == len(set(used)) == 8
    assert all(len({s.node for s in inst.stages}) == 1 for inst in placed[0])
    assert pack_high_affinity(cluster, Shape(4, 1), 1, Shape(3, 1), 2) is None  # 3+3 cannot pack
    spanning = pack_high_affinity(cluster, Shape(2, 4), 1, Shape(1, 1), 0)
    assert spanning is not None and spanning[0][0].nodes == (0, 1)


def _fake(rate: float, ok_below: float) -> SimResult:
    p = Percentiles(0, 0, 0, 0)
    return SimResult(rate=rate, ttft=(), tpot=(), attainment=1.0 if rate <= ok_below else 0.0,
                     ttft_attainment=1, tpot_attainment=1, ttft_pct=p, tpot_pct=p, throughput=rate)


def test_goodput_bisection_is_ordered_and_capped() -> None:
    found = [find_goodput(lambda r, t=t: _fake(r, t), 0.9, start=5.0).rate for t in (3, 7, 7.5, 40)]
    assert all(a <= b for a, b in zip(found, found[1:]))
    assert found[0] == pytest.approx(3, rel=0.03) and found[3] == pytest.approx(40, rel=0.03)
    assert find_goodput(lambda r: _fake(r, 40), 0.9, start=5.0, cap=12).rate <= 12
    assert find_goodput(lambda r: _fake(r, 0), 0.9, start=5.0).rate == 0.0
