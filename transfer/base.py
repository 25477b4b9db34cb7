"""The transport interface every KV backend implements (ray, shm, cuda_ipc, auto, nccl, local).

Protocol, source side: ``export`` the request's blocks into a ``KVHandle`` while the source keeps
the blocks; ``release`` the handle once the destination acked (or gave up).
Destination side: ``fetch`` copies the handle's blocks into blocks it reserved, or raises
``TransferError`` (including on timeout, a dead source, or an export released meanwhile) leaving
the destination to free its reservation. Every wait inside ``fetch`` is bounded by ``timeout_s``.

Optional parts, found with ``getattr`` by the instance actors: ``never_waits(handle)`` (True: its
fetch only copies memory this process maps, so it may run on a step thread: shm, cuda_ipc,
local, auto on one node); ``allocator_for(device)`` gives what makes a ``device`` engine's KV cache
(shm, auto: in shared memory for a CPU engine; cuda_ipc, auto: on the GPU, shared through CUDA
IPC), or None; ``serve_<op>(*args)`` runs on the source
when a destination asks through the actor's ``kv_source(name, op, *args)`` (auto: an object-store
export for another node; nccl: connect, send); ``close()`` releases what outlives the process
(shared-memory files, NCCL communicators) when the instance shuts down.
"""
from __future__ import annotations

from typing import Protocol

import torch

from tandem.transfer.protocol import KVHandle, KVLayout


class TransferError(RuntimeError):
    """A KV transfer failed or timed out; the message names the request and the reason."""



class Transport(Protocol):
    name: str

    def export(self, kv_cache: torch.Tensor, request_id: str, block_ids: list[int],
               num_tokens: int) -> KVHandle: ...

    def fetch(self, handle: KVHandle, kv_cache: torch.Tensor, block_ids: list[int],
              timeout_s: float) -> None: ...

    def release(self, handle: KVHandle) -> None: ...


def layout_of(kv_cache: torch.Tensor) -> KVLayout:
    layers, _, _, block_size, heads, head_dim = kv_cache.shape
    return KVLayout(layers, block_size, heads, head_dim, str(kv_cache.dtype).removeprefix("torch."))


def gather_blocks(kv_cache: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """One contiguous ``[L, 2, n, block_size, Hkv, D]`` copy of the given blocks."""
    index = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    return kv_cache.index_select(2, index)


def scatter_blocks(kv_cache: torch.Tensor, block_ids: list[int], blocks: torch.Tensor) -> None:
    """Write ``[L, 2, n, ...]`` blocks into the cache at ``block_ids``."""
    if blocks.shape[2] != len(block_ids) or blocks.shape[3:] != kv_cache.shape[3:]:
        raise TransferError(
            f"KV shape {tuple(blocks.shape)} does not fit {len(block_ids)} blocks of cache "
            f"{tuple(kv_cache.shape)}"
        )
    index = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    kv_cache.index_copy_(2, index, blocks.to(kv_cache.device))


def check_layout(handle: KVHandle, kv_cache: torch.Tensor) -> None:
    mine = layout_of(kv_cache)
    if handle.layout != mine:
        raise TransferError(f"request {handle.request_id}: KV layout {handle.layout} != destination {mine}")
