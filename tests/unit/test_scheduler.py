"""The scheduler's decisions are plain data: test them without a model."""
from tandem.engine.block_manager import BlockManager
from tandem.engine.params import SamplingParams
from tandem.engine.scheduler import Scheduler, SchedulerConfig
from tandem.engine.sequence import Sequence, Status
from tandem.engine.tokenizer import DetokenizerState


def seq(rid: str, n: int) -> Sequence:
    return Sequence(rid, list(range(n)), n, SamplingParams(temperature=0), None,
                    DetokenizerState.after_prompt(n))


def make(num_blocks=8, block_size=4, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size))


def test_prefill_fcfs_under_token_budget_then_decode():
    s = make(max_num_batched_tokens=10)
    for rid, n in [("a", 4), ("b", 5), ("c", 3)]:
        s.add(seq(rid, n))
    plan = s.schedule()
    assert plan.kind == "prefill" and [q.request_id for q in plan.seqs] == ["a", "b"]
    assert plan.num_tokens == 9
    plan = s.schedule()
    assert plan.kind == "prefill" and [q.request_id for q in plan.seqs] == ["c"]
    for q in s.running:
        q.token_ids.append(0)  # the sampled first token
    plan = s.schedule()
    assert plan.kind == "decode" and len(plan.seqs) == 3 and not plan.preempted


def test_oversized_prompt_runs_alone():
    s = make(num_blocks=16, max_num_batched_tokens=4)
    s.add(seq("big", 20))
    s.add(seq("small", 2))
    assert [q.request_id for q in s.schedule().seqs] == ["big"]


def test_max_num_seqs_caps_the_batch():
    s = make(max_num_seqs=2)
    for i in range(3):
        s.add(seq(f"r{i}", 2))
    assert len(s.schedule().seqs) == 2
    assert s.schedule().kind == "decode"  # the third waits for a free seat


def test_preempts_latest_arrival_when_blocks_run_out():
    s = make(num_blocks=2, block_size=4)
    s.add(seq("old", 4))
    s.add(seq("new", 4))
    assert len(s.schedule().seqs) == 2
    for q in s.running:
        q.token_ids.append(0)  # each now needs a 5th slot -> a second block
    plan = s.schedule()
    assert plan.kind == "decode"
    assert [q.request_id for q in plan.seqs] == ["old"]
    assert [q.request_id for q in plan.preempted] == ["new"]
    new = plan.preempted[0]
    assert new.status is Status.WAITING and new.num_preemptions == 1
    assert "new" not in s.blocks.tables and s.waiting[0] is new
    s.finish(plan.seqs[0])
    assert s.blocks.num_free == 2
    plan = s.schedule()  # recompute over prompt + output so far
    assert plan.kind == "prefill" and plan.seqs[0] is new and plan.num_tokens == 5


def test_prefill_only_and_detach_keeps_blocks():
    s = make(enable_decode=False)
    s.add(seq("a", 6))
    plan = s.schedule()
    s.detach(plan.seqs[0])
    assert s.schedule() is None
    assert s.blocks.num_free == 6  # 2 of 8 still held for the hand-over
    s.blocks.free("a")
    assert s.blocks.num_free == 8


def test_abort_from_waiting_frees_nothing_twice():
    s = make()
    a = seq("a", 4)
    s.add(a)
    assert s.find("a") is a
    s.finish(a)
    assert s.find("a") is None and s.blocks.num_free == 8 and not s.has_work()
