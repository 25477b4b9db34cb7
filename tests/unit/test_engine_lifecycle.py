"""Property: any interleaving of add / step / abort (and blocks held by an in-flight transfer) keeps
the block accounting exact, never crashes the step loop, and returns every block once everything
is finished or aborted. Greedy requests still produce transformers' tokens, however often they are
preempted and recomputed on the way."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.params import SamplingParams
from tandem.engine.sequence import Status
from tests.reference import hf_greedy

BLOCK_SIZE = 4
NUM_BLOCKS = 12  # 48 tokens: a few requests at once, so decode growth preempts
MAX_NEW = 14
POOL_LENS = [1, 3, 4, 5, 9, 16, 20]  # every prompt + MAX_NEW fits the cache alone (<= 34 tokens)
MAX_STEPS_TO_DRAIN = 400


def _pool() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in POOL_LENS]


POOL = _pool()


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> Engine:
    return Engine(tiny_llama_dir, EngineConfig(dtype="float32", block_size=BLOCK_SIZE,
                                               num_blocks=NUM_BLOCKS))


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path) -> list[list[int]]:
    return hf_greedy(tiny_llama_dir, POOL, MAX_NEW)


def check_invariants(engine: Engine, shares: list[list[int]]) -> None:
    blocks, scheduler = engine.blocks, engine.scheduler
    free = list(blocks._free)
    assert len(free) == len(set(free)), "a block is on the free list twice"
    owned = [b for table in blocks.tables.values() for b in table]
    assert len(owned) == len(set(owned)), "a block is in two tables"
    held = set(owned).union(*map(set, shares))
    assert not held & set(free), "a held block is also free"
    assert blocks.num_free + len(held) == blocks.num_blocks, "a block leaked"
    running = {s.request_id for s in scheduler.running}
    assert set(blocks.tables) == running, "only running requests hold tables"
    for seq in scheduler.running:  # KV for every token but the newest, plus room for it next step
        assert len(blocks.tables[seq.request_id]) * BLOCK_SIZE >= seq.num_tokens - 1
        assert seq.status is Status.RUNNING
    assert all(s.status is Status.WAITING for s in scheduler.waiting)


# An op is (kind, a, b, mode); kinds repeat in the list to weight adds and steps up, since
# preemption needs several requests growing at once. Hypothesis starts from "simple" (zero) draws,
# so zero maps to the longest prompt, the largest max_tokens and the most steps.
KINDS = ["add"] * 4 + ["step"] * 3 + ["abort", "share", "release"]
op = st.tuples(st.sampled_from(KINDS), st.integers(0, 1000), st.integers(0, 1000),
               st.sampled_from(["greedy", "seeded", "eos"]))


def params_for(mode: str, max_tokens: int) -> SamplingParams:
    if mode == "greedy":
        return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    if mode == "seeded":
        return SamplingParams(max_tokens=max_tokens, temperature=1.0, top_k=50, seed=max_tokens)
    return SamplingParams(max_tokens=max_tokens, temperature=0.8, stop_token_ids=[7, 11, 13])


def test_any_interleaving_returns_every_block(engine: Engine, reference: list[list[int]]) -> None:
    totals: Counter = Counter()

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(ops=st.lists(op, min_size=4, max_size=30), abort_rest=st.booleans())
    def run(ops, abort_rest: bool) -> None:
        requests: list[tuple[str, int, int, str]] = []  # id, pool index, max_tokens, mode
        outputs: dict[str, list[int]] = {}
        reasons: dict[str, str] = {}
        shares: list[list[int]] = []

        def step() -> None:
            plan, deltas = engine.run_step()
            if plan is not None:
                totals["preempted"] += len(plan.preempted)
                totals[plan.kind] += 1
            for delta in deltas:
                assert delta.request_id not in reasons, "a token after the request finished"
                outputs[delta.request_id].extend(delta.token_ids)
                if delta.finish_reason:
                    reasons[delta.request_id] = delta.finish_reason
            check_invariants(engine, shares)

        for kind, a, b, mode in ops:
            if kind == "add":
                idx, max_tokens = len(POOL) - 1 - a % len(POOL), MAX_NEW - b % MAX_NEW
                rid = engine.add_request(POOL[idx], params_for(mode, max_tokens))
                requests.append((rid, idx, max_tokens, mode))
                outputs[rid] = []
            elif kind == "step":
                for _ in range(6 - a % 6):
                    step()
            elif kind == "abort" and requests:
                running = engine.scheduler.running
                if b % 2 == 0 and running:  # a running request, or any ever added
                    rid = running[a % len(running)].request_id
                else:
                    rid = requests[a % len(requests)][0]
                was_running = engine.scheduler.find(rid) in running
                delta = engine.abort(rid)
                assert (delta is None) == (rid in reasons)
                if delta is not None:
                    reasons[rid] = "abort"
                    totals["abort_running" if was_running else "abort_waiting"] += 1
                    assert rid not in engine.blocks.tables
            elif kind == "share" and engine.blocks.tables:  # a transfer starts: it refs the blocks
                tables = list(engine.blocks.tables.values())
                table = list(tables[a % len(tables)])
                engine.blocks.share(table)
                shares.append(table)
                totals["shares"] += 1
            elif kind == "release" and shares:  # ...and ends
                engine.blocks.release(shares.pop(a % len(shares)))
            check_invariants(engine, shares)

        if abort_rest:
            for rid, *_ in requests:
                if engine.abort(rid) is not None:
                    reasons[rid] = "abort"
        for table in shares:  # transfers finish; what they held must come back too
            engine.blocks.release(table)
        shares.clear()
        for _ in range(MAX_STEPS_TO_DRAIN):
            if not engine.has_unfinished():
                break
            step()
        assert not engine.has_unfinished(), "requests still unfinished: the engine is stuck"
        assert engine.blocks.num_free == engine.blocks.num_blocks
        assert not engine.blocks.tables

        eos = set(engine.model_config.eos_token_ids)
        for rid, idx, max_tokens, mode in requests:
            out, reason = outputs[rid], reasons[rid]
            if reason == "length":
                assert len(out) == max_tokens
            elif reason == "stop":
                assert out[-1] in (eos | {7, 11, 13}) and len(out) <= max_tokens
            else:
                assert reason == "abort" and len(out) <= max_tokens
            if mode == "greedy":  # however it was batched, preempted or cut short
                assert out == reference[idx][:len(out)]

    run()
    # The property must actually have exercised the hard paths.
    assert totals["preempted"] > 0 and totals["abort_running"] > 0 and totals["shares"] > 0, totals
    assert totals["decode"] > 0 and totals["prefill"] > 0, totals


def test_all_preempted_step_waits_for_transfers_instead_of_crashing(tiny_llama_dir: Path) -> None:
    """Blocks held by an in-flight transfer can leave a decode step with no request that fits; the
    step must preempt and wait (not crash the instance loop), and resume once they come back."""
    engine = Engine(tiny_llama_dir, EngineConfig(dtype="float32", block_size=4, num_blocks=6))
    long = engine.add_request(POOL[3], SamplingParams(max_tokens=19, temperature=0, ignore_eos=True))
    short = engine.add_request(POOL[1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    engine.step()  # prefill both
    exported = list(engine.blocks.tables[short])
    engine.blocks.share(exported)  # a transfer of `short`'s KV is in flight...
    engine.abort(short)  # ...when it is aborted: the transfer still holds its block
    for _ in range(40):
        engine.step()
    seq = engine.scheduler.find(long)
    assert seq is not None and seq.num_preemptions == 1 and seq.status is Status.WAITING
    engine.blocks.release(exported)  # the transfer ends
    while engine.has_unfinished():
        engine.step()
    assert seq.finish_reason == "length"
    assert seq.output_token_ids == hf_greedy(tiny_llama_dir, [POOL[3]], 19)[0]
    assert engine.blocks.num_free == engine.blocks.num_blocks
