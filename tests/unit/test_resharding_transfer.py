"""KV moved between instances of different (tp, pp) through the shared-memory transport, one
transport (and pool) per worker as in a deployment: every destination worker's cache must hold, bit for bit, the slice of the model's KV
that its shard owns, read from the source workers' shards (transfer/sharded.py). The reference is
one whole-model cache cut into shards by the layout arithmetic, independently of the plan."""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from tandem.engine.parallel import Parallelism, kv_head_range, layer_range, parallelism_error
from tandem.transfer.base import TransferError, layout_of
from tandem.transfer.sharded import fetch_kv, fetch_shard, sharded_handle
from tandem.transfer.shm import ShmTransport

LAYERS, BLOCK_SIZE, HEAD_DIM, HEADS = 3, 4, 8, 8
SRC_BLOCKS, DST_BLOCKS = [3, 4, 5, 9], [7, 1, 2, 6]
NUM_BLOCKS = 12


def _shapes(kv_heads: int) -> list[Parallelism]:
    return [Parallelism(tp, pp) for tp in (1, 2, 4) for pp in (1, 2)
            if parallelism_error(Parallelism(tp, pp), num_heads=HEADS, num_kv_heads=kv_heads,
                                 num_layers=LAYERS) is None]


def _model_kv(kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Random raw bits (NaN patterns included: only a bit-exact copy reproduces them)."""
    shape = (LAYERS, 2, NUM_BLOCKS, BLOCK_SIZE, kv_heads, HEAD_DIM)
    raw = torch.randint(0, 256, (torch.Size(shape).numel() * dtype.itemsize,), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(kv_heads))
    return raw.view(dtype).reshape(shape)


def _shard_of(full: torch.Tensor, par: Parallelism, rank: int) -> torch.Tensor:
    tp_rank, pp_rank = par.coords(rank)
    layers = layer_range(full.shape[0], par.pp, pp_rank)
    heads = kv_head_range(full.shape[4], par.tp, tp_rank)
    return full[layers.start:layers.stop, :, :, :, heads.start:heads.stop]


class _Workers:
    """One transport per worker, each worker's cache allocated by it where it allocates caches
    (shm: in its own pool)."""

    def __init__(self, par: Parallelism, shapes: list[tuple[int, ...]], dtype, make=ShmTransport) -> None:
        self.transports = [make() for _ in shapes]
        self.caches = [t.allocate(s, dtype) if hasattr(t, "allocate") else torch.zeros(s, dtype=dtype)
                       for t, s in zip(self.transports, shapes)]
        self.par = par

    def close(self) -> None:
        for transport in self.transports:
            getattr(transport, "close", lambda: None)()


def _source(full: torch.Tensor, par: Parallelism, make=ShmTransport) -> tuple[_Workers, object]:
    shards = [_shard_of(full, par, rank) for rank in range(par.world_size)]
    workers = _Workers(par, [tuple(s.shape) for s in shards], full.dtype, make)
    for cache, shard in zip(workers.caches, shards):
        cache.copy_(shard)
    handles = [t.export(c, "r1", SRC_BLOCKS, len(SRC_BLOCKS) * BLOCK_SIZE)
               for t, c in zip(workers.transports, workers.caches)]
    if par == Parallelism(1, 1):
        return workers, handles[0]
    handle = sharded_handle(handles[0].transport, "r1", len(SRC_BLOCKS) * BLOCK_SIZE, len(SRC_BLOCKS),
                            layout_of(full), par, handles)
    return workers, handle


def _destination(full: torch.Tensor, par: Parallelism, make=ShmTransport) -> _Workers:
    shapes = [tuple(_shard_of(full, par, rank).shape) for rank in range(par.world_size)]
    return _Workers(par, shapes, full.dtype, make)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_every_destination_worker_gets_its_exact_slice(kv_heads):
    check_every_pair(kv_heads, ShmTransport)


def check_every_pair(kv_heads: int, make) -> None:
    """Every (source, destination) pair of shapes: each destination worker's cache holds exactly
    its shard of the moved blocks, bit for bit, and nothing else changed. ``make`` builds a
    worker's transport (tests/integration runs this with the object-store transport)."""
    full = _model_kv(kv_heads, torch.bfloat16)
    want = full[:, :, SRC_BLOCKS]
    for src, dst in itertools.product(_shapes(kv_heads), repeat=2):
        source, handle = _source(full, src, make)
        dest = _destination(full, dst, make)
        try:
            for rank, (transport, cache) in enumerate(zip(dest.transports, dest.caches)):
                # Each destination worker fetches through its own transport, as a worker actor does.
                fetch_shard(transport, handle, dst, rank, cache, DST_BLOCKS, 5.0)
                got = cache[:, :, DST_BLOCKS]
                assert torch.equal(got.view(torch.int16), _shard_of(want, dst, rank).view(torch.int16)), \
                    (src, dst, rank)
                untouched = [b for b in range(NUM_BLOCKS) if b not in DST_BLOCKS]
                assert not cache[:, :, untouched].view(torch.int16).any()
        finally:
            source.close()
            dest.close()


@contextlib.contextmanager
def _single_destination(src: Parallelism):
    """(model KV, source workers, their handle, a single-worker destination), closed afterwards."""
    full = _model_kv(2, torch.float32)
    source, handle = _source(full, src)
    dest = _destination(full, Parallelism(1, 1))
    try:
        yield full, source, handle, dest
    finally:
        source.close()
        dest.close()


def test_a_single_worker_destination_reads_a_sharded_source_through_fetch_kv():
    with _single_destination(Parallelism(2, 2)) as (full, _, handle, dest):
        fetch_kv(dest.transports[0], handle, dest.caches[0], DST_BLOCKS, 5.0)
        assert torch.equal(dest.caches[0][:, :, DST_BLOCKS].view(torch.int32),
                           full[:, :, SRC_BLOCKS].view(torch.int32))


def test_a_released_source_shard_fails_the_fetch_naming_the_request():
    with _single_destination(Parallelism(2, 1)) as (_, source, handle, dest):
        source.transports[1].release(handle.payload.handles[1])
        with pytest.raises(TransferError, match="request r1: KV was released"):
            fetch_kv(dest.transports[0], handle, dest.caches[0], DST_BLOCKS, 5.0)


def test_a_cache_of_the_wrong_shard_shape_is_refused():
    full = _model_kv(2, torch.float32)
    source, handle = _source(full, Parallelism(2, 1))
    wrong = torch.zeros(LAYERS, 2, NUM_BLOCKS, BLOCK_SIZE, 2, HEAD_DIM)  # tp=2 rank holds 1 KV head
    try:
        with pytest.raises(TransferError, match="does not fit this worker's cache"):
            fetch_shard(ShmTransport(), handle, Parallelism(2, 1), 0, wrong, DST_BLOCKS, 5.0)
    finally:
        source.close()
