"""In-process transports (local, shm) and the block-copy helpers: byte-exact round trips, late or
racing fetches, and no shared-memory leaks."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tandem.transfer.base import TransferError
from tandem.transfer.blockcopy import block_runs, copy_blocks, raw_numpy
from tandem.transfer.local import LocalTransport
from tandem.transfer.shm import ShmTransport
from tandem.transfer.shm_pool import PREFIX, SHM_DIR, SharedPool, sweep_orphans

SHAPE = (3, 2, 0, 4, 2, 8)  # [layers, K/V, blocks (filled in), block_size, kv heads, head_dim]
# (source ids, destination ids): odd counts, gaps, reversed order, runs on one side only.
ID_CASES = [
    ([0], [6]),
    ([1, 2, 3, 4, 5], [9, 10, 11, 12, 13]),
    ([7, 2, 9, 4, 0], [1, 3, 5, 7, 8]),
    ([4, 5, 6, 10, 11, 12, 13], [13, 12, 2, 3, 4, 0, 14]),
]


def cache_shape(num_blocks: int) -> tuple[int, ...]:
    return (*SHAPE[:2], num_blocks, *SHAPE[3:])


def random_bits(num_blocks: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random raw bits (NaN and inf patterns included): only a bit-exact copy reproduces them."""
    shape = cache_shape(num_blocks)
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return raw.view(dtype).reshape(shape)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def our_pools() -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith(f"{PREFIX}-local-{os.getpid()}-")}


@pytest.fixture
def shm_pair():
    """Two shm 'instances' in this process; their pools must be gone afterwards."""
    before = our_pools()
    source, dest = ShmTransport(), ShmTransport()
    yield source, dest
    names = {t.pool.name for t in (source, dest) if t.pool is not None}
    source.close()
    dest.close()
    assert not (our_pools() - before) and not names & set(os.listdir(SHM_DIR))


def setup(kind: str, dtype: torch.dtype, shm_pair=None):
    """(source transport, source cache filled with random bits, dest transport, dest cache)."""
    if kind == "local":
        source = dest = LocalTransport()
        src_cache, dst_cache = torch.empty(cache_shape(16), dtype=dtype), torch.zeros(cache_shape(15), dtype=dtype)
    else:
        source, dest = shm_pair
        src_cache = source.allocate(cache_shape(16), dtype)
        dst_cache = dest.allocate(cache_shape(15), dtype)
    src_cache.copy_(random_bits(16, dtype, seed=1))
    return source, src_cache, dest, dst_cache


# --- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ids", ID_CASES, ids=["1block", "5run", "5scattered", "7mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["local", "shm"])
def test_round_trip_is_byte_exact(kind, dtype, ids, request):
    pair = request.getfixturevalue("shm_pair") if kind == "shm" else None
    source, src_cache, dest, dst_cache = setup(kind, dtype, pair)
    src_ids, dst_ids = ids
    handle = pickle.loads(pickle.dumps(source.export(src_cache, "r1", src_ids, 17)))  # as via Ray
    assert (handle.num_blocks, handle.num_tokens, handle.layout.dtype) == (len(src_ids), 17, str(dtype)[6:])
    dest.fetch(handle, dst_cache, dst_ids, timeout_s=1.0)
    for s, d in zip(src_ids, dst_ids):
        assert torch.equal(bits(dst_cache[:, :, d]), bits(src_cache[:, :, s]))
    untouched = [b for b in range(15) if b not in dst_ids]
    assert not bits(dst_cache[:, :, untouched]).any()
    source.release(handle)


def test_block_runs_coalesce_only_when_both_sides_are_consecutive():
    assert block_runs([4, 5, 6, 10, 11], [0, 1, 2, 3, 4]) == [(4, 0, 3), (10, 3, 2)]
    assert block_runs([1, 2, 3], [3, 2, 1]) == [(1, 3, 1), (2, 2, 1), (3, 1, 1)]
    assert block_runs([], []) == []
    with pytest.raises(ValueError, match="2 source blocks for 1"):
        block_runs([1, 2], [1])


@pytest.mark.parametrize("src_ids,dst_ids", [([16], [0]), ([0], [15]), ([-1], [0])])
def test_copy_blocks_refuses_ids_outside_the_cache(src_ids, dst_ids):
    src, dst = raw_numpy(torch.zeros(cache_shape(16))), raw_numpy(torch.zeros(cache_shape(15)))
    with pytest.raises(ValueError, match="outside"):
        copy_blocks(src, src_ids, dst, dst_ids)


# --- shm: late and racing fetches ---------------------------------------------------------------

def test_fetch_after_release_fails(shm_pair):
    source, src_cache, dest, dst_cache = setup("shm", torch.float32, shm_pair)
    handle = source.export(src_cache, "r1", [1, 2], 20)
    source.release(handle)
    source.release(handle)  # idempotent
    with pytest.raises(TransferError, match="r1: KV was released before the fetch"):
        dest.fetch(handle, dst_cache, [0, 1], 1.0)


def test_reused_slot_does_not_revive_an_old_handle(shm_pair):
    source, src_cache, dest, dst_cache = setup("shm", torch.float32, shm_pair)
    old = source.export(src_cache, "r1", [1, 2], 20)
    source.release(old)
    new = source.export(src_cache, "r2", [1, 2], 20)  # same blocks, same (free-list) slot
    assert new.payload.slot == old.payload.slot and new.payload.epoch != old.payload.epoch
    with pytest.raises(TransferError, match="released before"):
        dest.fetch(old, dst_cache, [0, 1], 1.0)
    source.release(old)  # a stale release must not end the newer export
    dest.fetch(new, dst_cache, [0, 1], 1.0)


def test_release_during_the_copy_discards_it(shm_pair, monkeypatch):
    import tandem.transfer.shm as shm_module

    source, src_cache, dest, dst_cache = setup("shm", torch.float32, shm_pair)
    handle = source.export(src_cache, "r1", [3, 4], 20)
    real_copy = shm_module.copy_blocks

    def racing_copy(*args):  # the source's hold timeout fires mid-copy and reuses the blocks
        real_copy(*args)
        source.release(handle)
        src_cache[:, :, [3, 4]] = 0

    monkeypatch.setattr(shm_module, "copy_blocks", racing_copy)
    with pytest.raises(TransferError, match="released during the fetch"):
        dest.fetch(handle, dst_cache, [0, 1], 1.0)


def test_mismatches_fail_clearly(shm_pair):
    source, src_cache, dest, dst_cache = setup("shm", torch.float32, shm_pair)
    with pytest.raises(TransferError, match="exports only the cache it allocated"):
        source.export(torch.zeros_like(src_cache), "r0", [1], 4)
    handle = source.export(src_cache, "r1", [1, 2], 20)
    with pytest.raises(TransferError, match="2 blocks exported, 3 reserved"):
        dest.fetch(handle, dst_cache, [0, 1, 2], 1.0)
    with pytest.raises(TransferError, match="outside"):
        dest.fetch(handle, dst_cache, [0, 15], 1.0)
    with pytest.raises(TransferError, match="layout"):
        dest.fetch(handle, torch.zeros(cache_shape(15), dtype=torch.bfloat16), [0, 1], 1.0)
    with pytest.raises(TransferError, match="already exported"):
        source.export(src_cache, "r1", [3], 4)


def test_other_node_is_refused():
    source, dest = ShmTransport(node_id="aaaa"), ShmTransport(node_id="bbbb")
    try:
        cache = source.allocate(cache_shape(4), torch.float32)
        handle = source.export(cache, "r1", [1], 4)
        with pytest.raises(TransferError, match="on node aaaa, this instance is on node bbbb"):
            dest.fetch(handle, torch.zeros(cache_shape(4)), [0], 1.0)
    finally:
        source.close()


def test_fetch_from_a_source_that_shut_down_fails(shm_pair):
    source, src_cache, dest, dst_cache = setup("shm", torch.float32, shm_pair)
    first = source.export(src_cache, "r1", [1], 4)
    dest.fetch(first, dst_cache, [0], 1.0)  # dest now caches a mapping of the source's pool
    second = source.export(src_cache, "r2", [2], 4)
    source.close()
    assert not (SHM_DIR / source.pool.name).exists()
    with pytest.raises(TransferError, match="is gone"):
        dest.fetch(second, dst_cache, [1], 1.0)
    assert not dest._peers  # the dead pool's mapping was dropped, not kept alive


# --- shm: pool lifetime -------------------------------------------------------------------------

def test_pool_is_zeroed_shared_and_unlinked():
    pool = SharedPool(cache_shape(5), torch.bfloat16, num_slots=4)
    path = pool.path
    assert path.exists() and pool.tensor.shape == cache_shape(5)
    assert pool.tensor.dtype == torch.bfloat16 and not pool.tensor.any()
    assert pool.tensor.data_ptr() % 64 == 0
    pool.tensor[1, 1, 4] = 3.5
    pool.unlink()
    assert not path.exists() and float(pool.tensor[1, 1, 4, 0, 0, 0]) == 3.5  # mapping survives


def test_pool_that_cannot_be_reserved_says_why_and_leaves_nothing(tmp_path: Path):
    with pytest.raises(OSError, match="cannot reserve .* shared memory .* use transfer backend 'ray'"):
        SharedPool((2**40, 1024), torch.float32, num_slots=4, directory=tmp_path)
    assert not list(tmp_path.iterdir())


_CHILD = """
import os, signal, sys, torch
from tandem.transfer.shm_pool import SharedPool
pool = SharedPool((2, 2, 3, 4), torch.float32, num_slots=4, directory=sys.argv[1])
print(pool.name, flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _child_pool(directory: Path, how: str) -> str:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(directory), how],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == (-signal.SIGKILL if how == "kill" else 0), out.stderr
    return out.stdout.strip()


def test_pool_is_unlinked_at_exit_and_swept_after_sigkill(tmp_path: Path):
    assert not (tmp_path / _child_pool(tmp_path, "exit")).exists()  # atexit unlinked it
    killed = _child_pool(tmp_path, "kill")
    assert (tmp_path / killed).exists()  # SIGKILL ran nothing...
    live = tmp_path / f"{PREFIX}-local-{os.getpid()}-00"
    live.touch()
    assert sweep_orphans(tmp_path, "local") == [killed]  # ...so the next pool sweeps it
    assert live.exists() and not (tmp_path / killed).exists()  # a live creator's file is kept


# --- the engine's allocator hook ----------------------------------------------------------------

def _generate(engine, prompt: list[int]) -> list[int]:
    from tandem.engine.params import SamplingParams

    rid = engine.add_request(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    tokens = []
    while engine.has_unfinished():
        tokens += [t for d in engine.step() if d.request_id == rid for t in d.token_ids]
    return tokens


def test_engine_runs_on_a_shared_memory_cache(tiny_llama_dir, shm_pair):
    from tandem.engine.engine import Engine, EngineConfig

    transport, _ = shm_pair
    config = EngineConfig(dtype="float32", num_blocks=8, block_size=4)
    engine = Engine(tiny_llama_dir, config, kv_allocator=transport.allocate)
    assert engine.kv_cache.data_ptr() == transport.pool.tensor.data_ptr()
    assert engine.kv_cache.shape[2] == 8
    prompt = [5, 17, 42, 9, 33, 7]
    assert _generate(engine, prompt) == _generate(Engine(tiny_llama_dir, config), prompt)
    assert transport.pool.tensor.any()  # the model wrote its KV into the shared pool
