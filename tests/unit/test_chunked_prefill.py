"""Chunked prefill with stall-free batching (engine/scheduler.py, engine/attention.py).

The scheduler's plans are checked as plain data; the engine's greedy fp32 tokens are checked
against transformers on the same weights with chunk budgets on and around the block size, so
chunks start and end inside blocks, on block edges and one token past them; and every block
returns to the free list, preemption of a half-prefilled prompt included.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tandem.engine import LLM, SamplingParams
from tandem.engine.block_manager import BlockManager
from tandem.engine.scheduler import Scheduler, SchedulerConfig
from tandem.engine.sequence import Sequence, Status
from tandem.engine.tokenizer import DetokenizerState
from tests.reference import hf_greedy
from tests.unit.test_engine_parity import BLOCK_SIZE, GREEDY, NEW_TOKENS, PROMPTS, assert_same_tokens


def seq(rid: str, n: int) -> Sequence:
    return Sequence(rid, list(range(n)), n, SamplingParams(temperature=0), None,
                    DetokenizerState.after_prompt(n))


def chunked(num_blocks=16, block_size=4, **cfg) -> Scheduler:
    cfg.setdefault("max_num_seqs", min(8, cfg.get("max_num_batched_tokens", 8)))
    return Scheduler(SchedulerConfig(chunked_prefill=True, **cfg), BlockManager(num_blocks, block_size))


def sampled(s: Scheduler, plan) -> None:
    """What the engine does after a step: each request that reached its newest token gets one."""
    for i in plan.sampling_rows():
        plan.seqs[i].token_ids.append(0)


# -- plans -----------------------------------------------------------------------------------


def test_the_budget_must_hold_a_decode_for_every_running_request():
    with pytest.raises(ValueError, match="max_num_batched_tokens >= max_num_seqs"):
        SchedulerConfig(chunked_prefill=True, max_num_batched_tokens=16, max_num_seqs=32)
    SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=32)  # whole prompts: no such rule


def test_a_long_prompt_is_split_over_steps_and_decodes_go_first():
    s = chunked(max_num_batched_tokens=6)
    s.add(seq("short", 3))
    s.add(seq("long", 10))
    plan = s.schedule()  # short whole, 3 tokens of long
    assert plan.kind == "mixed" and plan.chunks == ((0, 3), (0, 3))
    assert plan.sampling_rows() == [0] and s.find("long").status is Status.PREFILLING
    sampled(s, plan)
    plan = s.schedule()  # short decodes first, then the next 5 tokens of long
    assert [q.request_id for q in plan.seqs] == ["short", "long"]
    assert plan.chunks == ((3, 1), (3, 5)) and plan.sampling_rows() == [0]
    sampled(s, plan)
    plan = s.schedule()
    assert plan.chunks == ((4, 1), (8, 2)) and plan.sampling_rows() == [0, 1]
    assert s.find("long").status is Status.RUNNING
    sampled(s, plan)
    plan = s.schedule()  # both decode: an ordinary decode step
    assert plan.kind == "decode" and len(plan.seqs) == 2
    assert s.blocks.tables["long"] == s.blocks.tables["long"][:3] and len(s.blocks.tables["long"]) == 3


def test_the_budget_holds_every_step_and_blocks_cover_only_what_is_cached():
    s = chunked(num_blocks=64, max_num_batched_tokens=5)
    for rid, n in [("a", 9), ("b", 2), ("c", 13)]:
        s.add(seq(rid, n))
    for _ in range(12):
        plan = s.schedule()
        assert plan.num_tokens <= 5
        for q, (start, n) in zip(plan.seqs, plan.chunks or [(q.num_tokens - 1, 1) for q in plan.seqs]):
            assert len(s.blocks.tables[q.request_id]) == -(-(start + n) // 4)
        sampled(s, plan)
    assert all(q.status is Status.RUNNING for q in s.running)


def test_a_long_prompt_shares_its_steps_with_the_prompts_behind_it():
    capped = chunked(max_num_batched_tokens=16, long_prefill_tokens=8)
    uncapped = chunked(max_num_batched_tokens=16)
    for s in (capped, uncapped):
        s.add(seq("long", 40))
        s.add(seq("short", 6))
    plan = capped.schedule()
    assert plan.chunks == ((0, 8), (0, 6)) and plan.sampling_rows() == [1]  # short's first token now
    sampled(capped, plan)
    assert capped.schedule().chunks == ((6, 1), (8, 8))  # short decodes, long goes on 8 at a time
    assert uncapped.schedule().chunks == ((0, 16),)  # without the cap short waits for long's chunks
    with pytest.raises(ValueError, match="long_prefill_tokens must be >= 1"):
        SchedulerConfig(long_prefill_tokens=0)


def test_max_num_seqs_caps_decodes_and_new_prompts():
    s = chunked(max_num_batched_tokens=100, max_num_seqs=2)
    for rid in "abc":
        s.add(seq(rid, 2))
    plan = s.schedule()
    assert [q.request_id for q in plan.seqs] == ["a", "b"] and [q.request_id for q in s.waiting] == ["c"]


def test_a_prompt_mid_prefill_is_preempted_when_a_decode_needs_its_blocks():
    s = chunked(num_blocks=4, block_size=4, max_num_batched_tokens=6)
    s.add(seq("old", 4))
    sampled(s, s.schedule())  # old: 4 tokens in 1 block, now holds 5 tokens
    s.add(seq("new", 12))
    plan = s.schedule()  # old decodes (a second block), new takes 5 tokens (2 blocks)
    assert plan.chunks == ((4, 1), (0, 5)) and s.blocks.num_free == 0
    sampled(s, plan)
    plan = s.schedule()  # new's next chunk shrinks to the 3 slots left in its blocks
    assert plan.chunks == ((5, 1), (5, 3))
    sampled(s, plan)
    plan = s.schedule()  # no room for new at all: it waits, holding its blocks, old decodes
    assert plan.kind == "decode" and [q.request_id for q in plan.seqs] == ["old"]
    sampled(s, plan)
    sampled(s, s.schedule())  # old: 8 tokens, its second block full
    plan = s.schedule()  # old needs a third block: the half-prefilled prompt goes
    assert [q.request_id for q in plan.preempted] == ["new"] and plan.kind == "decode"
    new = s.waiting[0]
    assert new.request_id == "new" and new.status is Status.WAITING and new.num_cached == 0
    assert "new" not in s.blocks.tables


def test_prefill_only_and_decode_only_instances_keep_to_their_phase():
    prefill = chunked(max_num_batched_tokens=4, enable_decode=False)
    prefill.add(seq("a", 6))
    plan = prefill.schedule()
    assert plan.chunks == ((0, 4),)
    sampled(prefill, plan)
    plan = prefill.schedule()
    assert plan.chunks == ((4, 2),) and plan.sampling_rows() == [0]
    sampled(prefill, plan)
    assert prefill.schedule() is None  # a running request waits for its hand-over, never decodes
    decode = chunked(max_num_batched_tokens=4, enable_prefill=False)
    decode.add(seq("b", 3))
    assert decode.schedule() is None


# -- the engine against transformers ---------------------------------------------------------


@pytest.fixture(scope="module")
def llama_reference(tiny_llama_dir: Path) -> list[list[int]]:
    return hf_greedy(tiny_llama_dir, PROMPTS, NEW_TOKENS)


def _run(model_dir: Path, budget: int, num_blocks: int = 128, params=GREEDY, prompts=PROMPTS,
         long_prefill_tokens: int | None = None):
    llm = LLM(model_dir, dtype="float32", block_size=BLOCK_SIZE, num_blocks=num_blocks,
              chunked_prefill=True, max_num_batched_tokens=budget, max_num_seqs=min(budget, 8),
              long_prefill_tokens=long_prefill_tokens)
    plans = []
    schedule = llm.engine.scheduler.schedule

    def spy():
        before = {q.request_id: q.status for q in llm.engine.scheduler.running}
        plan = schedule()
        if plan is not None:
            plans.append((plan.kind, plan.chunks, tuple(before[q.request_id] for q in plan.preempted)))
        return plan

    llm.engine.scheduler.schedule = spy
    outs = llm.generate(prompts, params)
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks and not llm.engine.blocks.tables
    return outs, plans


@pytest.mark.parametrize("budget", [7, 15, 16, 17, 33])
def test_chunked_greedy_matches_transformers(tiny_llama_dir: Path, llama_reference, budget: int) -> None:
    outs, plans = _run(tiny_llama_dir, budget)
    assert_same_tokens([o.token_ids for o in outs], llama_reference, PROMPTS)
    mixed = [chunks for kind, chunks, _ in plans if kind == "mixed"]
    assert any(any(start > 0 and n > 1 for start, n in c) for c in mixed), "no chunk continued a prompt"
    assert any(any(n == 1 for _, n in c) and any(n > 1 for _, n in c) for c in mixed), \
        "no step mixed decodes with a prompt chunk"


def test_capped_chunks_match_transformers(tiny_llama_dir: Path, llama_reference) -> None:
    outs, plans = _run(tiny_llama_dir, 33, long_prefill_tokens=10)
    assert_same_tokens([o.token_ids for o in outs], llama_reference, PROMPTS)
    assert max(n for _, chunks, _ in plans for _, n in chunks) == 10


def test_chunked_parity_with_preemption_mid_prompt(tiny_llama_dir: Path, llama_reference) -> None:
    # The 100-token prompt alone needs 7 blocks and grows to 9; 12 blocks for the whole batch.
    outs, plans = _run(tiny_llama_dir, 24, num_blocks=12)
    assert_same_tokens([o.token_ids for o in outs], llama_reference, PROMPTS)
    preempted = [status for *_, statuses in plans for status in statuses]
    assert Status.PREFILLING in preempted, "a half-prefilled prompt should have been preempted"


def test_seeded_sampling_does_not_change_with_chunking(tiny_llama_dir: Path) -> None:
    """A prompt mid-way through its chunks samples nothing, so its RNG draws stay those of an
    unchunked run."""
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    whole = LLM(tiny_llama_dir, dtype="float32", num_blocks=128).generate(PROMPTS, params)
    outs, _ = _run(tiny_llama_dir, 9, params=params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in whole]
