"""KV transfer between instances of any (tp, pp): a source's handle per worker, and a destination
worker's fetch of exactly the slices ``transfer/layout.py`` assigns it. No Ray.

A parallel instance's KV lives on its workers, one shard each; its export is one ``KVHandle`` per
worker, made by that worker's own transport, wrapped in a ``ShardedKV`` payload. A handle from a
single-worker source is the (1, 1) case of the same thing. A destination worker fetches, for each
source worker it needs something from, that worker's blocks through the transport — straight into
its cache when the two shards are the same (layers, KV heads), otherwise into a staging buffer
from which it copies its slices. Matching shapes therefore cost what they always cost; a
resharding move costs one extra local copy of what it reads.
"""
from __future__ import annotations

from itertools import groupby

import msgspec
import torch

from tandem.engine.parallel import Parallelism
from tandem.transfer.base import TransferError, Transport
from tandem.transfer.layout import KVSlice, WorkerKV, reshard_plan, worker_kv
from tandem.transfer.protocol import KVHandle, KVLayout

SINGLE = Parallelism(1, 1)


class ShardedKV(msgspec.Struct, frozen=True):
    """Payload of a parallel source's handle: its parallelism and one handle per worker (by rank)."""

    parallelism: Parallelism
    handles: list[KVHandle]


def sharded_handle(name: str, request_id: str, num_tokens: int, num_blocks: int, layout: KVLayout,
                   parallelism: Parallelism, handles: list[KVHandle]) -> KVHandle:
    """The handle of a parallel source's export; ``layout`` is the whole model's (all layers, all
    KV heads), each worker's own handle carries its shard's."""
    return KVHandle(name, request_id, num_tokens, num_blocks, layout, ShardedKV(parallelism, handles))


def source_of(handle: KVHandle) -> tuple[Parallelism, list[KVHandle]]:
    payload = handle.payload
    if isinstance(payload, ShardedKV):
        return payload.parallelism, payload.handles
    return SINGLE, [handle]


def is_sharded(handle: KVHandle) -> bool:
    return isinstance(handle.payload, ShardedKV)


def fetch_kv(transport: Transport, handle: KVHandle, kv_cache, block_ids: list[int], timeout_s: float) -> None:
    """A destination instance's fetch of any source's handle: a parallel instance's transport
    (``reshards``) has its workers fetch their slices; a single-worker one copies the slices of a
    sharded source's workers into its whole cache."""
    if is_sharded(handle) and not getattr(transport, "reshards", False):
        fetch_shard(transport, handle, SINGLE, 0, kv_cache, block_ids, timeout_s)
    else:
        transport.fetch(handle, kv_cache, block_ids, timeout_s)


def fetch_shard(transport: Transport, handle: KVHandle, dst: Parallelism, dst_rank: int,
                kv_cache: torch.Tensor, block_ids: list[int], timeout_s: float) -> None:
    """Destination worker ``dst_rank`` of a ``dst`` instance copies its slices of ``handle``'s KV
    into ``block_ids`` of its own ``kv_cache``; TransferError naming the request on any failure."""
    src, handles = source_of(handle)
    if src == SINGLE and dst == SINGLE:
        transport.fetch(handle, kv_cache, block_ids, timeout_s)
        return
    model = handle.layout
    mine = worker_kv(dst, model.num_layers, model.num_kv_heads, dst_rank)
    _check_shard(handle, kv_cache, mine)
    pieces = [p for p in reshard_plan(src, dst, model.num_layers, model.num_kv_heads) if p.dst_rank == dst_rank]
    for src_rank, group in groupby(pieces, key=lambda p: p.src_rank):
        theirs = worker_kv(src, model.num_layers, model.num_kv_heads, src_rank)
        _fetch_from(transport, handles[src_rank], theirs, list(group), mine, kv_cache, block_ids, timeout_s)


def _fetch_from(transport: Transport, handle: KVHandle, theirs: WorkerKV, pieces: list[KVSlice],
                mine: WorkerKV, kv_cache: torch.Tensor, block_ids: list[int], timeout_s: float) -> None:
    """One source worker's part: straight into the cache when its shard is exactly ours."""
    if theirs == mine:
        transport.fetch(handle, kv_cache, block_ids, timeout_s)
        return
    layout = handle.layout
    staging = torch.empty((layout.num_layers, 2, len(block_ids), layout.block_size, layout.num_kv_heads,
                           layout.head_dim), dtype=kv_cache.dtype, device=kv_cache.device)
    transport.fetch(handle, staging, list(range(len(block_ids))), timeout_s)
    index = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    for piece in pieces:
        src_layers, src_heads = theirs.local(piece)
        dst_layers, dst_heads = mine.local(piece)
        kv_cache[dst_layers, :, :, :, dst_heads].index_copy_(2, index, staging[src_layers, :, :, :, src_heads])


def _check_shard(handle: KVHandle, kv_cache: torch.Tensor, mine: WorkerKV) -> None:
    layers, _, _, block_size, kv_heads, head_dim = kv_cache.shape
    want = (mine.layers[1] - mine.layers[0], block_size, mine.kv_heads[1] - mine.kv_heads[0], head_dim)
    model = handle.layout
    if (layers, block_size, kv_heads, head_dim) != want or model.block_size != block_size \
            or model.head_dim != head_dim or model.dtype != str(kv_cache.dtype).removeprefix("torch."):
        raise TransferError(f"request {handle.request_id}: KV of model layout {model} does not fit this "
                            f"worker's cache {tuple(kv_cache.shape)} {kv_cache.dtype}")
