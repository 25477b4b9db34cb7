import pytest
from hypothesis import given, settings, strategies as st

from tandem.engine.block_manager import BlockManager, OutOfBlocksError, blocks_needed


def test_allocate_append_free_round_trip():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.can_allocate(9) and not bm.can_allocate(17)
    table = bm.allocate("a", 9)
    assert len(table) == 3 and bm.num_free == 1
    assert bm.slot("a", 5) == table[1] * 4 + 1
    assert bm.can_append("a", 12) and bm.can_append("a", 16) and not bm.can_append("a", 17)
    bm.append_slot("a", 13)
    assert len(bm.tables["a"]) == 4 and bm.num_free == 0
    with pytest.raises(OutOfBlocksError):
        bm.allocate("b", 1)
    bm.free("a")
    bm.free("a")  # idempotent
    assert bm.num_free == 4 and not bm.tables


def test_shared_blocks_survive_first_free():
    bm = BlockManager(num_blocks=2, block_size=2)
    table = list(bm.allocate("a", 3))
    bm.share(table)
    bm.free("a")
    assert bm.num_free == 0  # still referenced by the other owner
    bm.release(table)
    assert bm.num_free == 2
    with pytest.raises(ValueError):
        bm.share(table)  # free blocks cannot be shared


def test_allocation_errors_name_the_problem():
    bm = BlockManager(num_blocks=1, block_size=2)
    bm.allocate("a", 1)
    with pytest.raises(ValueError, match="already holds"):
        bm.allocate("a", 1)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=16)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "grow", "free"]), st.integers(0, 5),
                          st.integers(1, 40)), max_size=60))
def test_any_interleaving_conserves_blocks(ops):
    bm = BlockManager(num_blocks=8, block_size=4)
    lengths: dict[str, int] = {}
    for op, who, n in ops:
        rid = f"r{who}"
        if op == "alloc" and rid not in lengths and bm.can_allocate(n):
            bm.allocate(rid, n)
            lengths[rid] = n
        elif op == "grow" and rid in lengths and bm.can_append(rid, lengths[rid] + n):
            lengths[rid] += n
            bm.append_slot(rid, lengths[rid])
        elif op == "free":
            bm.free(rid)
            lengths.pop(rid, None)
        held = [b for t in bm.tables.values() for b in t]
        assert len(held) == len(set(held))  # no block owned twice
        assert len(held) + bm.num_free == 8
        for rid, length in lengths.items():
            assert len(bm.tables[rid]) == blocks_needed(length, 4)
    for rid in list(lengths):
        bm.free(rid)
    assert bm.num_free == 8
