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
from tandem.placement.workload import Arrival, BaseTrace, Fixed, LogNormal, Uniform, Workload, sample_base

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


def _assert_no_request_beats_running_alone(sim, prefilled: bool = True) -> None:  # type: ignore[no-untyped-def]
    """Lower bounds any correct schedule obeys: STEP's times grow with batch size and context, so
    a prompt is never prefilled faster than alone, and each of a request's ``output - 1`` decode
    tokens (colocated: decode or recompute steps) takes at least a batch-1 step at its prompt
    length. A simulator that drops steps, or finishes a preempted request without redoing its
    lost tokens, breaks the second bound."""
    for i, (arrive, first, done) in enumerate(zip(sim.arrival, sim.first, sim.finish)):
        length, out = sim.inputs[i], sim.outputs[i]
        if prefilled:
            assert first - arrive >= STEP.prefill(1, length, length**2)[0] * (1 - 1e-9), i
        assert done - first >= (out - 1) * STEP.decode(1, length) * (1 - 1e-9), i


def test_runs_are_deterministic_and_leak_nothing() -> None:
    pre, dec, tr = _joint(2, 2)
    sims = [DisaggSim(pre, dec, tr, POLICY, _trace(), 8.0) for _ in range(2)]
    a, b = (s.run(SLO) for s in sims)
    assert a == b
    for sim in sims:
        assert all(p.free == p.total and not p.queue and p.outstanding == 0 for p in sim.prefills)
        assert all(d.batch.free_blocks == d.batch.total_blocks and d.batch.size == 0 for d in sim.decodes)
        _assert_no_request_beats_running_alone(sim)


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
    _assert_no_request_beats_running_alone(sim)  # preempted requests still decode every token
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
    """Long prompts in the same steps as decoding inflate TPOT; a decode-only instance avoids it,
    so under a TPOT target between the two the colocated deployment misses it and disagg does not."""
    workload = Workload(arrival=Arrival(), rate=None, input_len=Fixed(1500), output_len=Fixed(64))
    trace = _trace(300, workload)
    colocated = ColocatedSim([InstanceModel(STEP, 3000)] * 2, POLICY, trace, 4.0).run(SLO)
    disagg = simulate_disaggregated(*_joint(1, 1), POLICY, trace, 4.0, SLO)
    assert colocated.tpot_pct.p90 > 1.5 * disagg.tpot_pct.p90
    assert len(colocated.ttft) == 300
    # A batch-1 decode step at 1500 tokens of context is ~19 ms on this model; 30 ms leaves the
    # decode-only instance room while a step carrying a 1500-token prompt (~210 ms) blows it.
    assert STEP.decode(1, 1500) < 0.030 < STEP.mixed(1, 1500, 1500**2, 1, 1500)
    tight = Slo(ttft_ms=1e6, tpot_ms=30)
    coloc_tight = ColocatedSim([InstanceModel(STEP, 3000)] * 2, POLICY, trace, 4.0).run(tight)
    disagg_tight = simulate_disaggregated(*_joint(1, 1), POLICY, trace, 4.0, tight)
    assert disagg_tight.tpot_attainment == 1.0 and disagg_tight.attainment == 1.0
    assert coloc_tight.tpot_attainment < 0.9
    # Attainment is the share of the reported per-request TPOTs under the target.
    assert coloc_tight.tpot_attainment == sum(p <= 0.030 for p in coloc_tight.tpot) / 300


def test_colocated_run_leaks_nothing_even_with_preemption() -> None:
    workload = Workload(arrival=Arrival(), rate=None, input_len=Fixed(200), output_len=Fixed(800))
    sim = ColocatedSim([InstanceModel(STEP, 250)], POLICY, _trace(40, workload), 1e9)
    result = sim.run(SLO)
    assert result.preemptions > 0
    _assert_no_request_beats_running_alone(sim, prefilled=False)
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


# Hand-traced runs and closed forms. Step times are dyadic fractions, so every event time below is
# exact in binary floating point and the expected values are written as the fractions the trace
# derives.

class LinearSteps:
    """A step model simple enough to trace by hand: prefill ``per_token * tokens`` (the next
    batch may start after ``busy_share`` of it: pipelining), decode ``fixed + per_seq * batch``,
    a colocated step the decode time plus ``per_token * tokens``. Context length is ignored."""

    def __init__(self, per_token: float = 0.0, fixed: float = 0.0, per_seq: float = 0.0,
                 busy_share: float = 1.0) -> None:
        self.per_token, self.fixed, self.per_seq, self.busy_share = per_token, fixed, per_seq, busy_share

    def prefill(self, seqs: int, tokens: int, sum_sq: float) -> tuple[float, float]:
        latency = self.per_token * tokens
        return latency, latency * self.busy_share

    def decode(self, batch: int, sum_ctx: int) -> float:
        return self.fixed + self.per_seq * batch

    def mixed(self, seqs: int, tokens: int, sum_sq: float, batch: int, sum_ctx: int) -> float:
        return self.decode(batch, sum_ctx) + self.per_token * tokens


LOOSE = Slo(ttft_ms=1e6, tpot_ms=1e6)
NO_WATERMARK = Policy(watermark=0.0)


def _fixed_trace(times, inputs, outputs) -> BaseTrace:  # type: ignore[no-untyped-def]
    return BaseTrace(times=tuple(times), inputs=tuple(inputs), outputs=tuple(outputs))


def test_hand_traced_disaggregated_run() -> None:
    """Three requests through one prefill and one decode instance, traced by hand:

    prefill 1/1024 s per token; decode step 1/64 + batch/128 s; transfer 1/256 s + 1/4096 s per
    token. r0 (64 tokens, 4 out) arrives at 0 and prefills alone in [0, 1/16]; r1 (64, 3 out) and
    r2 (128, 3 out) arrive meanwhile (1/32, 3/64) and go out as one 192-token batch in
    [1/16, 1/4]. r0's KV lands at 21/256; it decodes alone: 3 steps of 6/256 -> done at 39/256.
    r1's KV lands at 69/256 (decode idle: starts at once, one step to 75/256); r2's lands at
    73/256 mid-step, so it joins at 75/256: one batch-2 step (8/256) to 83/256 finishes r1, one
    more batch-1 step finishes r2 at 89/256."""
    trace = _fixed_trace([0.0, 1 / 32, 3 / 64], [64, 64, 128], [4, 3, 3])
    steps = LinearSteps(per_token=1 / 1024, fixed=1 / 64, per_seq=1 / 128)
    sim = DisaggSim([InstanceModel(steps, 1000)], [InstanceModel(steps, 1000)],
                    [[(1 / 256, 1 / 4096)]], POLICY, trace, 1.0)
    result = sim.run(LOOSE)
    assert sim.first == [1 / 16, 1 / 4, 1 / 4]
    assert sim.finish == [39 / 256, 83 / 256, 89 / 256]
    assert result.ttft == pytest.approx((1 / 16, 7 / 32, 13 / 64), abs=1e-12)
    assert result.tpot == pytest.approx((23 / 768, 19 / 512, 25 / 512), abs=1e-12)


def test_hand_traced_decode_preemption_refetches_the_kv() -> None:
    """Isolated decode, 4 blocks of 16 tokens, constant 1/64 s steps, 1/256 s per transfer, no
    watermark. r0 and r1 (16-token contexts, 39 tokens to decode) take 2 blocks each and join at
    steps 0 and 1. At step 16 r0 crosses 32 tokens and needs a fifth block: r1 (the newest,
    31 tokens of context, 24 to go) is preempted, freeing 2. r0 finishes at step 39 (time
    1/256 + 39/64), freeing 4; r1 is re-admitted, fetched again (another 1/256) and decodes its
    24 tokens: done at 2/256 + 63/64."""
    trace = _fixed_trace([0.0, 0.0], [16, 16], [40, 40])
    steps = LinearSteps(fixed=1 / 64)
    sim = DisaggSim([], [InstanceModel(steps, 4)], [[(1 / 256, 0.0)]], NO_WATERMARK, trace, 1.0)
    result = sim.run(LOOSE)
    assert result.preemptions == 1
    assert sim.finish == [157 / 256, 254 / 256]
    assert result.ttft == (0.0, 0.0)  # isolated decode: the first token comes with the request
    assert result.tpot == pytest.approx((157 / 256 / 39, 254 / 256 / 39), abs=1e-12)
    assert sim.decodes[0].batch.free_blocks == 4


def test_hand_traced_colocated_run() -> None:
    """One colocated instance: step 1/64 + batch/128 + prompt tokens/1024 s. r0 (64 tokens,
    3 out) prefills alone in [0, 5/64]; r1 (64, 2 out) arrives at 1/32 and is prefilled in the
    next step together with r0's first decode token: 1/64 + 1/128 + 1/16 = 11/128 s, to 21/128.
    Then one batch-2 decode step (1/32) finishes both at 25/128: r0's decode was stalled by r1's
    prompt, the interference disaggregation removes."""
    trace = _fixed_trace([0.0, 1 / 32], [64, 64], [3, 2])
    steps = LinearSteps(per_token=1 / 1024, fixed=1 / 64, per_seq=1 / 128)
    sim = ColocatedSim([InstanceModel(steps, 1000)], POLICY, trace, 1.0)
    result = sim.run(LOOSE)
    assert sim.first == [5 / 64, 21 / 128]
    assert sim.finish == [25 / 128, 25 / 128]
    assert result.ttft == pytest.approx((5 / 64, 17 / 128), abs=1e-12)
    assert result.tpot == pytest.approx((15 / 256, 1 / 32), abs=1e-12)


def test_hand_traced_chunked_colocated_run() -> None:
    """The run above with chunked prefill and a 32-token step budget (steps 1/64 + batch/128 +
    tokens/1024 s; a step with no decodes still pays 1/64). r0's 64 tokens take two 32-token
    steps of 3/64 (first token at 6/64); r1, waiting since 1/32, then rides beside r0's decodes
    in chunks of 31, 31 and 2 tokens: steps of 55/1024, 55/1024 (r0 done at 206/1024) and 18/1024
    (r1's first token at 224/1024), and one decode step of 24/1024 finishes r1 at 248/1024. r0's
    decode steps last 55/1024 s instead of the 88/1024 a whole 64-token prompt stalled it for."""
    trace = _fixed_trace([0.0, 1 / 32], [64, 64], [3, 2])
    steps = LinearSteps(per_token=1 / 1024, fixed=1 / 64, per_seq=1 / 128)
    policy = Policy(chunked_prefill=True, prefill_token_budget=32)
    sim = ColocatedSim([InstanceModel(steps, 1000)], policy, trace, 1.0)
    result = sim.run(LOOSE)
    assert sim.first == [96 / 1024, 224 / 1024]
    assert sim.finish == [206 / 1024, 248 / 1024]
    assert result.tpot == pytest.approx((55 / 1024, 24 / 1024), abs=1e-12)
    inst = sim.instances[0]
    assert inst.batch.free_blocks == 1000 and inst.queued_tokens == 0 and not inst.partial


def test_chunked_steps_charge_each_chunk_its_cached_prefix() -> None:
    """The attention term a chunked step reports: n * (2p + n) per chunk of n after p cached."""
    seen: list[tuple] = []

    class Recording(LinearSteps):
        def mixed(self, seqs, tokens, sum_sq, batch, sum_ctx):  # type: ignore[no-untyped-def]
            seen.append((seqs, tokens, sum_sq, batch))
            return 1 / 64

    trace = _fixed_trace([0.0], [100], [1])
    policy = Policy(chunked_prefill=True, prefill_token_budget=40)
    ColocatedSim([InstanceModel(Recording(), 1000)], policy, trace, 1.0).run(LOOSE)
    assert seen == [(1, 40, 40 * 40, 0), (1, 40, 40 * (80 + 40), 0), (1, 20, 20 * (160 + 20), 0)]
    seen.clear()  # a 30-token cap on one prompt's chunk: a prompt arriving behind it rides along
    trace = _fixed_trace([0.0, 0.001], [100, 10], [1, 1])
    capped = Policy(chunked_prefill=True, prefill_token_budget=40, long_prefill_tokens=30)
    ColocatedSim([InstanceModel(Recording(), 1000)], capped, trace, 1.0).run(LOOSE)
    assert seen[:2] == [(1, 30, 30 * 30, 0), (2, 40, 30 * (60 + 30) + 10 * 10, 0)]


def test_hand_traced_colocated_preemption_recomputes() -> None:
    """One colocated instance, 4 blocks of 16 tokens, every step 1/64 s, no watermark. r0 and r1
    (16-token prompts, 40 out) arrive together; r0 prefills in step 0, r1 in step 1 (first tokens
    at 1/64 and 2/64), joining the decode batch at steps 1 and 2. At step 17 r0 needs a fifth
    block: r1 (31 tokens of context, 24 to go) is preempted. r0 finishes at the end of step 39
    (40/64), freeing its 4 blocks; step 40 recomputes r1's 31 tokens and samples one, its 23 more
    decode steps end at 64/64. Its first token stays the one from before the preemption."""
    trace = _fixed_trace([0.0, 0.0], [16, 16], [40, 40])
    sim = ColocatedSim([InstanceModel(LinearSteps(fixed=1 / 64), 4)], NO_WATERMARK, trace, 1.0)
    result = sim.run(LOOSE)
    assert result.preemptions == 1
    assert sim.first == [1 / 64, 2 / 64]
    assert sim.finish == [40 / 64, 64 / 64]
    assert result.tpot == pytest.approx((1 / 64, 62 / 64 / 39), abs=1e-12)
    assert sim.instances[0].batch.free_blocks == 4


@pytest.mark.parametrize("busy_share,gap", [(1.0, 1 / 16), (0.5, 3 / 32), (0.5, 1 / 32), (1.0, 1 / 4)],
                         ids=["overloaded", "pipelined-keeps-up", "pipelined-overloaded", "idle"])
def test_deterministic_arrivals_match_dd1(busy_share: float, gap: float) -> None:
    """D/D/1 (deterministic arrivals every ``gap`` s, service S = 1/8 s, next batch after
    B = busy_share * S, batch size 1), the complement of test_placement_queueing's M/D/1 case:
    request k waits k * max(0, B - gap), so TTFT_k = S + k * max(0, B - gap) exactly, the
    attainment of a TTFT target L is #{k : TTFT_k <= L} / n, and completions come every
    max(B, gap) seconds."""
    n, service, target = 40, 1 / 8, 1.03
    trace = _fixed_trace([k * gap for k in range(1, n + 1)], [128] * n, [1] * n)
    steps = LinearSteps(per_token=service / 128, busy_share=busy_share)
    policy = Policy(prefill_token_budget=128, prefill_max_batch=1)
    slo = Slo(ttft_ms=target * 1000, tpot_ms=1e6)
    result = simulate_disaggregated([InstanceModel(steps, 10**6)], [], NO_TRANSFER, policy, trace, 1.0, slo)
    backlog = max(0.0, busy_share * service - gap)
    expected = [service + k * backlog for k in range(n)]
    assert result.ttft == pytest.approx(expected, abs=1e-12)
    assert result.attainment == sum(t <= target for t in expected) / n
    assert result.throughput == pytest.approx(1 / max(busy_share * service, gap), rel=1e-12)
    if backlog:  # the closed form's own count: the last k with S + k * backlog <= L, plus one
        assert result.attainment == (math.floor((target - service) / backlog) + 1) / n
