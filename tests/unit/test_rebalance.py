"""The rebalancing policy (pure): Llumnix freeness, pairing the least free instance with the
freest, shortest-running requests first, no move that would swap the imbalance, drains, triggers
and the in-flight budget."""
from __future__ import annotations

from dataclasses import replace

from tandem.cluster.rebalance import Budget, InstanceLoad, Running, plan_moves
from tandem.cluster.spec_types import MigrationSpec

ON = MigrationSpec(enabled=True, imbalance_threshold=4.0, max_moves_per_pass=8)


def _running(prefix: str, sizes: list[int], outputs: list[int] | None = None) -> tuple[Running, ...]:
    outputs = outputs or [10 * (i + 1) for i in range(len(sizes))]
    return tuple(Running(f"{prefix}{i}", size, out) for i, (size, out) in enumerate(zip(sizes, outputs)))


def test_freeness_is_free_blocks_after_demand_per_running_request():
    load = InstanceLoad("a", free_blocks=40, demand_blocks=10, running=_running("a", [5, 5, 5]))
    assert load.freeness == 10.0
    assert InstanceLoad("b", free_blocks=3, demand_blocks=9).freeness == -6.0  # no request: per one
    assert InstanceLoad("c", 20, 0, _running("c", [4]), num_running=4).freeness == 5.0  # unmovable count too


def test_balanced_instances_move_nothing():
    loads = [InstanceLoad("a", 40, 0, _running("a", [4, 4])), InstanceLoad("b", 38, 0, _running("b", [4, 4]))]
    assert plan_moves(loads, ON, Budget(10_000)) == []


def test_the_least_free_instance_sends_its_shortest_running_requests_to_the_freest():
    a = InstanceLoad("a", 4, 0, _running("a", [10, 6, 8], outputs=[50, 5, 20]))  # freeness 1.33
    b = InstanceLoad("b", 60, 0, _running("b", [4]))  # freeness 60
    c = InstanceLoad("c", 30, 0, _running("c", [4]))
    moves = plan_moves([a, b, c], ON, Budget(10_000))
    assert [m.request_id for m in moves] == ["a1"]  # fewest output tokens first; then a is the
    # freer of a and c per request (a2 or a0 more would leave c less free than a)
    assert moves[0].source == "a" and moves[0].dest == "b" and moves[0].why == "imbalance"
    assert all(m.source != m.dest for m in moves)


def test_a_move_that_would_only_swap_the_imbalance_is_not_made():
    a = InstanceLoad("a", 2, 0, _running("a", [30]))  # one long request: freeness 2
    b = InstanceLoad("b", 40, 0, _running("b", [2, 2, 2, 2]))  # freeness 10
    assert plan_moves([a, b], ON, Budget(10_000)) == []  # b would end at 10/5 = 2 < a's 32: it would come back


def test_preemptions_trigger_a_move_below_the_threshold():
    a = InstanceLoad("a", 10, 0, _running("a", [2] * 5), preempted=1)  # freeness 2
    b = InstanceLoad("b", 18, 0, _running("b", [2] * 3))  # freeness 6: a gap of 4, not over 4
    assert plan_moves([InstanceLoad("a", 10, 0, _running("a", [2] * 5)), b], ON, Budget(10_000)) == []
    (move,) = plan_moves([a, b], ON, Budget(10_000))  # one move relieves it
    assert move.why == "preemption" and move.source == "a" and move.request_id == "a0"


def test_a_drain_moves_everything_to_open_instances_that_fit_it():
    a = InstanceLoad("a", 0, 0, _running("a", [8, 8, 30]), draining=True)
    b = InstanceLoad("b", 20, 0, _running("b", [1]))
    c = InstanceLoad("c", 12, 0, (), draining=True)
    moves = plan_moves([a, b, c], MigrationSpec(), Budget(10_000))  # drains run even with rebalancing off
    assert [(m.request_id, m.dest, m.why) for m in moves] == [("a0", "b", "drain"), ("a1", "b", "drain")]


def test_the_budget_bounds_blocks_in_flight_per_instance():
    a = InstanceLoad("a", 0, 0, _running("a", [6, 6, 6, 6]))
    b = InstanceLoad("b", 100, 0, ())
    moves = plan_moves([a, b], ON, Budget(13, {"a": 1}))
    assert len(moves) == 2  # 1 + 6 + 6 fits in 13, a third does not
    assert plan_moves([a, b], ON, Budget(13, {"b": 8})) == []


def test_moves_per_pass_are_capped_and_disabled_rebalancing_moves_nothing():
    a = InstanceLoad("a", 0, 0, _running("a", [2] * 10))
    b = InstanceLoad("b", 100, 0, ())
    assert len(plan_moves([a, b], MigrationSpec(enabled=True, max_moves_per_pass=3), Budget(10_000))) == 3
    assert plan_moves([a, b], MigrationSpec(enabled=False), Budget(10_000)) == []


def test_queued_demand_counts_against_a_destination():
    a = InstanceLoad("a", 2, 0, _running("a", [4, 4]))  # freeness 1
    b = InstanceLoad("b", 50, 48, _running("b", [4]))  # 50 free but 48 promised: freeness 2
    assert plan_moves([a, b], ON, Budget(10_000)) == []


def test_growth_counts_against_freeness_and_keeps_a_move_from_overfilling_its_destination():
    """Blocks held now say nothing of what a request will grow into: with a horizon, a request
    that still has many tokens to produce weighs its growth, and no move goes where that growth
    would not fit (it would only be preempted there, or preempt others)."""
    a = InstanceLoad("a", 0, 0, (Running("a0", 4, 10, growth_blocks=12), Running("a1", 4, 50, growth_blocks=1)))
    assert a.freeness == (0 - 13) / 2  # free after demand and growth, per request
    b = InstanceLoad("b", 15, 0, (Running("b0", 2, 5),))
    # a0, the shortest-running, would need 4 + 12 blocks at b, which has 15: not made; a1 fits
    (move,) = plan_moves([a, b], ON, Budget(10_000))
    assert move.request_id == "a1" and move.dest == "b"
    blind = [InstanceLoad("a", 0, 0, (Running("a0", 4, 10), Running("a1", 4, 50))), b]
    assert [m.request_id for m in plan_moves(blind, ON, Budget(10_000))] == ["a0"]  # the shortest


def test_waiting_requests_are_redispatched_first_and_take_no_copy_budget():
    """A queued request holds no KV (its prompt's blocks are demand): it moves by re-dispatch,
    which copies nothing, so the block budget does not bound it."""
    a = InstanceLoad("a", 10, 12, (Running("w0", 6, 0, waiting=True), Running("w1", 6, 0, waiting=True),
                                   Running("r0", 3, 5)), num_running=3)  # freeness (10-12)/3
    b = InstanceLoad("b", 40, 0, ())
    moves = plan_moves([a, b], ON, Budget(0))  # nothing may be copied
    assert [(m.request_id, m.kind) for m in moves] == [("w0", "redispatch"), ("w1", "redispatch")]
    assert all(m.dest == "b" for m in moves)


def test_short_running_requests_move_by_recompute_below_the_knob():
    a = InstanceLoad("a", 0, 0, (Running("short", 2, 3, num_tokens=8), Running("long", 9, 4, num_tokens=34)))
    b = InstanceLoad("b", 100, 0, ())
    policy = MigrationSpec(enabled=True, recompute_max_tokens=16, max_moves_per_pass=8)
    kinds = {m.request_id: m.kind for m in plan_moves([a, b], policy, Budget(10_000))}
    assert kinds == {"short": "recompute", "long": "copy"}
    moves = plan_moves([a, b], policy, Budget(5))  # a recompute copies nothing: only a copy counts
    assert [(m.request_id, m.kind) for m in moves] == [("short", "recompute")]


def test_a_drain_redispatches_waiting_requests_too():
    a = InstanceLoad("a", 0, 4, (Running("w", 4, 0, waiting=True), Running("r", 2, 3)), draining=True)
    b = InstanceLoad("b", 20, 0, ())
    moves = plan_moves([a, b], MigrationSpec(), Budget(10_000))
    assert {(m.request_id, m.kind) for m in moves} == {("w", "redispatch"), ("r", "copy")}


def test_the_routers_view_weighs_queued_requests_as_demand_and_running_ones_with_their_growth():
    """``Rebalancer.loads`` from the router's records: a request with no token yet (colocated,
    queued) is a waiting one whose prompt blocks are demand; a running one holds its context's
    blocks and grows by at most the horizon, fewer if its ``max_tokens`` ends it first."""
    from tandem.cluster.dispatch import Dispatcher
    from tandem.cluster.migration import MigrationDesk
    from tandem.cluster.rebalancer import Rebalancer
    from tandem.cluster.requests import RequestRecord
    from tandem.engine.params import SamplingParams

    dispatch = Dispatcher(decode_policy="freeness")
    dispatch.set_free_blocks("a", 50, block_size=4)
    dispatch.set_free_blocks("b", 80)
    queued = RequestRecord("q", [1] * 10, SamplingParams(max_tokens=100))
    near_end = RequestRecord("n", [1] * 10, SamplingParams(max_tokens=8), token_ids=[2] * 6)
    long_ = RequestRecord("l", [1] * 10, SamplingParams(max_tokens=100), token_ids=[2] * 6)
    for rec in (queued, near_end, long_):
        rec.stage, rec.decode_instance = "decode", "a"
    dispatch.reserve_decode("a", "q", 11)  # what dispatch counted when it sent q to a
    desk = MigrationDesk({"a": None, "b": None}, dispatch, lambda rec: None, 1.0,
                         MigrationSpec(enabled=True, growth_horizon_tokens=20))
    a, b = Rebalancer(desk, lambda: [queued, near_end, long_]).loads()
    by_id = {r.request_id: r for r in a.running}
    assert 0 <= by_id["q"].waited_s < 60  # since it was sent to a
    assert replace(by_id["q"], waited_s=0.0) == Running("q", 3, 0, 10, waiting=True)  # 11 tokens: 3 blocks
    assert by_id["n"] == Running("n", 4, 6, 16, growth_blocks=1)  # 16 -> 18 tokens: one more block
    assert by_id["l"] == Running("l", 4, 6, 16, growth_blocks=5)  # 16 -> 36 tokens: five more
    assert (a.free_blocks, a.demand_blocks, a.growth_blocks, a.num_running) == (50, 3, 6, 3)
    assert b.running == () and b.room == 80


def test_a_queue_older_than_a_pass_goes_where_nothing_is_queued():
    """A stalled or swamped instance's queue: requests that waited longer than a pass interval
    move, oldest first, to the freest instance with nothing queued and room for them; fresh ones
    and instances that have a queue of their own are left alone."""
    stuck = InstanceLoad("a", 60, 4, (Running("old", 2, 0, waiting=True, waited_s=3.0),
                                      Running("older", 2, 0, waiting=True, waited_s=5.0),
                                      Running("new", 2, 0, waiting=True, waited_s=0.01)))
    busy = InstanceLoad("b", 64, 2, (Running("b0", 2, 0, waiting=True, waited_s=0.01),))
    idle = InstanceLoad("c", 62, 0, ())
    policy = MigrationSpec(enabled=True, interval_s=0.5, imbalance_threshold=100.0)
    moves = plan_moves([stuck, busy, idle], policy, Budget(0))
    assert [(m.request_id, m.dest, m.why, m.kind) for m in moves] == [
        ("older", "c", "queue", "redispatch"), ("old", "c", "queue", "redispatch")]
    assert plan_moves([stuck, busy], policy, Budget(0)) == []  # nowhere without a queue
