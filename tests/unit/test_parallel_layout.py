"""Shard arithmetic (engine/parallel.py) and resharding maps (transfer/layout.py), checked
exhaustively against a brute-force account of which worker holds which (layer, KV head)."""
from __future__ import annotations

import itertools
from collections import Counter

import pytest

from tandem.engine.parallel import (
    Parallelism, head_range, kv_head_range, kv_head_replicas, layer_range, parallelism_error, split_range,
)
from tandem.transfer.layout import reshard_plan, worker_kv

NUM_HEADS = 8


def _legal(tp: int, pp: int, kv_heads: int, layers: int) -> bool:
    return parallelism_error(Parallelism(tp, pp), num_heads=NUM_HEADS, num_kv_heads=kv_heads,
                             num_layers=layers) is None


def _shapes(kv_heads: int, layers: int) -> list[Parallelism]:
    return [Parallelism(tp, pp) for tp in range(1, 5) for pp in range(1, 5) if _legal(tp, pp, kv_heads, layers)]


def _owned(par: Parallelism, layers: int, kv_heads: int, rank: int) -> set[tuple[int, int]]:
    """Brute force: the (layer, KV head) cells a worker's cache holds."""
    tp_rank, pp_rank = par.coords(rank)
    return {(layer, head) for layer in layer_range(layers, par.pp, pp_rank)
            for head in kv_head_range(kv_heads, par.tp, tp_rank)}


@pytest.mark.parametrize("layers", [4, 5])
@pytest.mark.parametrize("kv_heads", [1, 2, 4, 8])
def test_every_destination_cell_comes_exactly_once_from_a_worker_that_holds_it(kv_heads, layers):
    shapes = _shapes(kv_heads, layers)
    assert len(shapes) >= 6
    for src, dst in itertools.product(shapes, shapes):
        plan = reshard_plan(src, dst, layers, kv_heads)
        for dst_rank in range(dst.world_size):
            got = Counter()
            for piece in (p for p in plan if p.dst_rank == dst_rank):
                cells = {(layer, head) for layer in range(*piece.layers) for head in range(*piece.kv_heads)}
                assert cells <= _owned(src, layers, kv_heads, piece.src_rank), (src, dst, piece)
                got.update(cells)
            assert set(got) == _owned(dst, layers, kv_heads, dst_rank), (src, dst, dst_rank)
            assert max(got.values()) == 1, (src, dst, dst_rank)


def test_replicated_heads_are_read_from_one_replica_spread_over_the_replicas():
    # 1 KV head replicated over 4 source ranks; 4 destination ranks each need it once.
    plan = reshard_plan(Parallelism(4, 1), Parallelism(4, 1), 2, 1)
    assert len(plan) == 4
    assert sorted(p.src_rank for p in plan) == [0, 1, 2, 3]
    # One destination worker needing all heads reads each from a single replica.
    plan = reshard_plan(Parallelism(4, 1), Parallelism(1, 1), 2, 2)
    assert [(p.src_rank, p.kv_heads) for p in plan] == [(0, (0, 1)), (2, (1, 2))]


def test_matching_shapes_copy_each_worker_to_its_twin_in_one_slice():
    par = Parallelism(2, 2)
    plan = reshard_plan(par, par, 4, 4)
    assert [(p.src_rank, p.dst_rank, p.layers, p.kv_heads) for p in plan] == [
        (0, 0, (0, 2), (0, 2)), (1, 1, (0, 2), (2, 4)), (2, 2, (2, 4), (0, 2)), (3, 3, (2, 4), (2, 4))]


def test_local_slices_index_the_workers_own_cache():
    src, dst = Parallelism(1, 2), Parallelism(2, 1)
    plan = reshard_plan(src, dst, 4, 2)
    piece = next(p for p in plan if p.src_rank == 1 and p.dst_rank == 1)
    assert piece.layers == (2, 4) and piece.kv_heads == (1, 2)
    assert worker_kv(src, 4, 2, 1).local(piece) == (slice(0, 2), slice(1, 2))
    assert worker_kv(dst, 4, 2, 1).local(piece) == (slice(2, 4), slice(0, 1))


def test_heads_layers_and_sizes_split_evenly_and_cover_everything():
    assert [list(head_range(8, 4, r)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [list(kv_head_range(2, 4, r)) for r in range(4)] == [[0], [0], [1], [1]]
    assert kv_head_replicas(2, 4, 1) == [2, 3]
    assert [list(layer_range(5, 3, s)) for s in range(3)] == [[0, 1], [2, 3], [4]]
    assert [len(split_range(10, 4, i)) for i in range(4)] == [3, 3, 2, 2]
    # With GQA, a rank's query heads read only the KV heads it holds.
    for tp in (1, 2, 4, 8):
        for rank in range(tp):
            group = NUM_HEADS // 2
            assert {h // group for h in head_range(NUM_HEADS, tp, rank)} <= set(kv_head_range(2, tp, rank))


@pytest.mark.parametrize("tp, pp, message", [
    (3, 1, "tp=3 does not divide the 8 attention heads"),
    (8, 1, None),
    (4, 1, None),
    (2, 5, "pp=5 exceeds the 4 layers"),
    (0, 1, "tp and pp must be integers >= 1"),
])
def test_illegal_shapes_are_named(tp, pp, message):
    error = parallelism_error(Parallelism(tp, pp), num_heads=8, num_kv_heads=2, num_layers=4)
    assert error == message if message is None else message in error


def test_kv_heads_neither_dividing_nor_divided_by_tp_are_refused():
    error = parallelism_error(Parallelism(4, 1), num_heads=12, num_kv_heads=6, num_layers=4)
    assert "tp=4 must divide the 6 KV heads or be a multiple of them" in error


def test_a_step_splits_into_micro_batches_of_whole_sequences_in_order():
    from tandem.engine.step_inputs import StepInputs, split_inputs

    prefill = StepInputs("prefill", list(range(10)), [4, 1, 3, 2], [[0], [1], [2], [3]])
    parts = split_inputs(prefill, 2)
    assert [p.seq_lens for p in parts] == [[4, 1], [3, 2]]
    assert [t for p in parts for t in p.token_ids] == list(range(10))
    assert [b for p in parts for b in p.block_tables] == [[0], [1], [2], [3]]
    decode = StepInputs("decode", [7, 8, 9], [5, 6, 7], [[0], [1], [2]])
    assert [p.token_ids for p in split_inputs(decode, 2)] == [[7, 8], [9]]
    assert [p.token_ids for p in split_inputs(decode, 4)] == [[7], [8], [9]]  # no empty micro-batch
    assert split_inputs(decode, 1) == [decode]
    # A long prompt first still leaves the next stage a micro-batch of its own.
    skewed = StepInputs("prefill", list(range(103)), [100, 1, 1, 1], [[0], [1], [2], [3]])
    assert [p.seq_lens for p in split_inputs(skewed, 3)] == [[100], [1], [1, 1]]


def test_micro_batches_too_small_to_pay_stay_whole():
    from tandem.engine.step_inputs import StepInputs, split_inputs

    decode = StepInputs("decode", list(range(8)), [9] * 8, [[i] for i in range(8)])
    assert split_inputs(decode, 2, min_tokens=32) == [decode]
    big = StepInputs("decode", list(range(64)), [9] * 64, [[i] for i in range(64)])
    assert [len(p.token_ids) for p in split_inputs(big, 2, min_tokens=32)] == [32, 32]
    prefill = StepInputs("prefill", list(range(40)), [20, 20], [[0], [1]])
    assert len(split_inputs(prefill, 2, min_tokens=32)) == 1
