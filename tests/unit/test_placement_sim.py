"""Simulator behaviour: block accounting, transfer time, memory back-pressure, routing, colocation."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.placement.hardware import get_profile
from tandem.placement.latency import AnalyticLatency, kv_transfer_cost
from tandem.placement.model_spec import load_model
from tandem.placement.policy import Policy
from tandem.placement.sim_colocated import ColocatedSim
from tandem.placement.sim_core import DecodeBatch, InstanceModel, Slo, percentiles
from tandem.placement.sim_disagg import DisaggSim, simulate_disaggregated
from tandem.placement.workload import Arrival, Fixed, LogNormal, Uniform, Workload, sample_base

MODEL = load_model("opt-13b")
A100 = get_profile("A100-80GB")
STEP = AnalyticLatency(MODEL, A100, "fp16", 1, 1)
SLO = Slo(ttft_ms=1000, tpot_ms=100)
POLICY = Policy()
CHAT = Workload(arrival=Arrival(), rate=None,
                input_len=LogNormal(mean=300, sigma=0.8, min=8, max=1500),
                output_len=Uniform(16, 256))
NO_TRANSFER = [[(0.0, 0.0)]]


def _trace(count: int = 400, workload: Workload = CHAT, seed: int = 0):  # type: ignore[no-untyped-def]
    return sample_base(workload, count, seed, MODEL.max_positions)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 200), st.integers(1, 60), st.integers(0, 3)),
                min_size=1, max_size=30),
       st.integers(20, 120))
def test_decode_batch_returns_every_block(joins, total: int) -> None:
    """Join sequences (reserving context + 1 token), step until all finish or are preempted;
    the free count must come back to the total whatever the interleaving."""
    batch, bs = DecodeBatch(total, 16), 16
    pending = list(enumerate(joins))
    while pending or batch.size:
        for rid, ctx, remaining in batch.grow():
            assert remaining >= 1 and ctx >= 1
        while pending and pending[0][1][2] <= batch.step % 4:
            rid, (ctx, remaining, _) = pending.pop(0)
            need = math.ceil((ctx + 1) / bs)
            if need <= batch.free_blocks:
                batch.free_blocks -= need
                batch.join(rid, ctx, remaining)
        if not batch.size:
            pending = pending[1:]  # nothing running: skip a sequence that does not fit
            continue
        assert batch.free_blocks >= 0
        batch.advance()
    assert batch.free_blocks == total and batch.sum_ctx == 0


def _joint(prefills: int, decodes: int, blocks: int | None = None, transfer: tuple = (0.0, 0.0)):  # type: ignore[no-untyped-def]
    inst = InstanceModel(STEP, 3000)
    dec = InstanceModel(STEP, blocks or 3000)
    return [inst] * prefills, [dec] * decodes, [[transfer] * decodes for _ in range(max(1, prefills))]


def test_runs_are_deterministic_and_leak_nothing() -> None:
    pre, dec, tr = _joint(2, 2)
    sims = [DisaggSim(pre, dec, tr, POLICY, _trace(), 8.0) for _ in range(2)]
    a, b = (s.run(SLO) for s in sims)
    assert a == b
    for sim in sims:
        assert all(p.free == p.total and not p.queue and p.outstanding == 0 for p in sim.prefills)
        assert all(d.batch.free_blocks == d.batch.total_blocks and d.batch.size == 0 for d in sim.decodes)
        assert min(sim.finish) >= 0


def test_transfer_time_shows_in_tpot() -> None:
    # One request at a time: TPOT grows by exactly transfer / (output - 1).
    workload = Workload(arrival=Arrival(), rate=None, input_len=Fixed(1000), output_len=Fixed(11))
    trace = _trace(50, workload)
    per_token = 2e-4  # 200 ms for the 1000-token prompt
    base = simulate_disaggregated([], [InstanceModel(STEP, 3000)], NO_TRANSFER, POLICY, trace, 0.05, SLO)
    slow = simulate_disaggregated([], [InstanceModel(STEP, 3000)], [[(0.0, per_token)]], POLICY,
                                  trace, 0.05, SLO)
    assert slow.tpot_pct.mean - base.tpot_pct.mean == pytest.approx(0.2 / 10, rel=1e-6)
    assert base.ttft_pct.p99 == 0.0  # isolated decode: requests arrive with their first token


def test_router_delay_adds_to_every_ttft_and_nothing_else() -> None:
    pre, dec, tr = _joint(1, 1)
    base = DisaggSim(pre, dec, tr, POLICY, _trace(), 4.0).run(SLO)
    late = DisaggSim(pre, dec, tr, POLICY, _trace(), 4.0, router_delay=0.25).run(SLO)
    assert [b - a for a, b in zip(base.ttft, late.ttft)] == pytest.approx([0.25] * len(base.ttft))
    assert late.tpot == base.tpot and late.throughput == base.throughput
    colocated = [ColocatedSim([InstanceModel(STEP, 3000)], POLICY, _trace(), 4.0, router_delay=d).run(SLO)
                 for d in (0.0, 0.25)]
    assert [b - a for a, b in zip(colocated[0].ttft, colocated[1].ttft)] == pytest.approx([0.25] * 400)
    assert colocated[1].tpot == colocated[0].tpot


def test_decode_memory_limits_throughput_and_backs_up_into_prefill() -> None:
    trace = _trace(400)
    roomy = DisaggSim(*_joint(1, 1, blocks=4000), POLICY, trace, 1e9)
    tight = DisaggSim(*_joint(1, 1, blocks=300), POLICY, trace, 1e9)  # ~4800 tokens of KV
    fast, slow = roomy.run(SLO), tight.run(SLO)
    assert slow.throughput < 0.5 * fast.throughput
    # The prefill instance holds finished prompts until decode admits them, so TTFT suffers too.
    assert slow.ttft_pct.p50 > fast.ttft_pct.p50


def test_preemption_when_decode_memory_runs_out() -> None:
    workload = Workload(arrival=Arrival(), rate=None, input_len=Fixed(100), output_len=Fixed(900))
    sim = DisaggSim(*_joint(1, 1, blocks=200), POLICY, _trace(60, workload), 1e9)
    result = sim.run(SLO)
    assert result.preemptions > 0
    assert min(sim.finish) > 0
    assert sim.decodes[0].batch.free_blocks == 200


def test_router_spreads_prefill_and_decode() -> None:
    trace = _trace(600)
    one = simulate_disaggregated(*_joint(1, 2), POLICY, trace, 12.0, SLO)
    two = simulate_disaggregated(*_joint(2, 2), POLICY, trace, 12.0, SLO)
    assert two.ttft_pct.mean < 0.7 * one.ttft_pct.mean
    sim = DisaggSim(*_joint(2, 3), POLICY, trace, 12.0)
    sim.run(SLO)
    assert set(sim.source) == {0, 1}
    assert all(d.batch.step > 100 for d in sim.decodes)  # every decode instance did work


def test_colocated_prompts_stall_decoding() -> None:
    # Long prompts in the same steps as decoding inflate TPOT; a decode-only instance avoids it.
    workload = Workload(arrival=Arrival(), rate=None, input_len=Fixed(1500), output_len=Fixed(64))
    trace = _trace(300, workload)
    colocated = ColocatedSim([InstanceModel(STEP, 3000)] * 2, POLICY, trace, 4.0).run(SLO)
    disagg = simulate_disaggregated(*_joint(1, 1), POLICY, trace, 4.0, SLO)
    assert colocated.tpot_pct.p90 > 1.5 * disagg.tpot_pct.p90
    assert colocated.attainment <= 1.0 and len(colocated.ttft) == 300


def test_colocated_run_leaks_nothing_even_with_preemption() -> None:
    workload = Workload(arrival=Arrival(), rate=None, input_len=Fixed(200), output_len=Fixed(800))
    sim = ColocatedSim([InstanceModel(STEP, 250)], POLICY, _trace(40, workload), 1e9)
    result = sim.run(SLO)
    assert result.preemptions > 0 and min(sim.finish) > 0
    inst = sim.instances[0]
    assert inst.batch.free_blocks == 250 and inst.queued_tokens == 0


def test_same_node_transfer_beats_cross_node_in_a_joint_run() -> None:
    trace = _trace(300)
    local = [[kv_transfer_cost(MODEL, A100, "fp16", 1, 1, True)]]
    remote = [[kv_transfer_cost(MODEL, A100, "fp16", 1, 1, False)]]
    pre, dec, _ = _joint(1, 1)
    near = simulate_disaggregated(pre, dec, local, POLICY, trace, 5.0, SLO)
    far = simulate_disaggregated(pre, dec, remote, POLICY, trace, 5.0, SLO)
    assert far.tpot_pct.mean > near.tpot_pct.mean


def test_percentiles_interpolate() -> None:
    p = percentiles([float(x) for x in range(101)])
    assert (p.mean, p.p50, p.p90, p.p99) == (50.0, 50.0, 90.0, 99.0)
    assert percentiles([]).p99 == 0.0
