"""Shared-memory transport (same node, CPU): one copy, from the source's pool into the destination's.

Each instance allocates its whole KV cache through ``ShmTransport.allocate`` (the engine's
``kv_allocator`` hook), so the cache lives in a /dev/shm file (see transfer/shm_pool.py). Export
is bookkeeping only; the destination maps the source's pool read-only (once per source, cached)
and copies the requested blocks straight into its own cache, one slice copy per run of consecutive
blocks (transfer/blockcopy.py).

Reading another process's live cache is safe only while the source keeps the blocks, which the
protocol guarantees until ``release`` (the source frees blocks only after releasing their export).
A fetch that comes late — after the hold timeout reclaimed the export, say, and the blocks hold
another request's KV — must fail instead of copying someone else's KV. Export epochs make that
checkable without any message to the source:

* ``export`` takes a free slot in the pool header and writes a fresh epoch into it (a per-pool
  counter starting at 1, never reused); the handle carries (pool, slot, epoch, block ids).
* ``release`` writes 0 into the slot, *before* the caller frees (and may reuse) the blocks.
* ``fetch`` checks ``slot == epoch``, copies, and checks again (a seqlock read). Seeing the epoch
  after the copy means the release store had not happened when the check ran; every write into
  the reused blocks comes after that store in the source's program order, so none of them reached
  the copy. Otherwise the fetch raises ``TransferError`` and the caller frees its reservation.
  Epochs are unique, so a slot freed and taken again never passes for the old export (no ABA).

The ordering argument needs stores to become visible in program order and the destination's
loads not to pass each other: x86-64 (TSO) gives both; elsewhere the full barriers around the
copy (torch/numpy release and take the GIL, a mutex) and on the source between release and the
next model step provide them. Slots are aligned int64s: single-copy atomic on x86-64 and AArch64.
"""
from __future__ import annotations

from pathlib import Path

import msgspec
import torch

from tandem.transfer.base import TransferError
from tandem.transfer.blockcopy import CacheView, copy_blocks
from tandem.transfer.export_slots import ExportSlots, PeerPools, check_fetch
from tandem.transfer.protocol import KVHandle
from tandem.transfer.shm_pool import SHM_DIR, SharedPool, pool_tag


class ShmRef(msgspec.Struct, frozen=True):
    """Payload of an shm handle: where the source's pool is and which export this is."""

    pool: str  # file name in the shm directory
    pool_blocks: int  # blocks in the source's cache (its shape otherwise follows the layout)
    slot: int
    epoch: int
    block_ids: list[int]


class ShmTransport:
    """Same-node CPU transport over shared-memory KV pools (see the module docstring)."""

    name = "shm"

    @staticmethod
    def never_waits(handle: KVHandle) -> bool:
        """A fetch copies from memory this process maps: it never waits on the source."""
        return True

    def __init__(self, node_id: str = "", directory: Path = SHM_DIR) -> None:
        self.node_id = node_id  # "" (unknown) skips the same-node check
        self.directory = Path(directory)
        self.pool: SharedPool | None = None
        self._exports: ExportSlots | None = None
        self._peers = PeerPools(self.directory)  # source pools mapped so far
        self._dest_view = CacheView()

    # -- source side ---------------------------------------------------------------------------

    def allocator_for(self, device: str):
        """``allocate`` for a CPU engine's cache; None for a GPU one (shared memory is host memory)."""
        return self.allocate if device == "cpu" else None

    @property
    def cache_allocated(self) -> bool:
        return self.pool is not None

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The instance's zero-filled KV cache, in shared memory (the engine's kv_allocator)."""
        if self.pool is not None:
            raise RuntimeError(f"this transport already allocated pool {self.pool.name}")
        # Every live export holds at least one block; twice that leaves room for shared blocks.
        num_slots = 2 * shape[2] + 16
        self.pool = SharedPool(tuple(shape), dtype, num_slots, pool_tag(self.node_id), self.directory)
        self._exports = ExportSlots(self.pool.slots)
        return self.pool.tensor

    def owns(self, kv_cache: torch.Tensor) -> bool:
        pool = self.pool
        return (pool is not None and kv_cache.data_ptr() == pool.tensor.data_ptr()
                and kv_cache.shape == pool.tensor.shape and kv_cache.dtype == pool.tensor.dtype)

    def export(self, kv_cache: torch.Tensor, request_id: str, block_ids: list[int],
               num_tokens: int) -> KVHandle:
        if not self.owns(kv_cache):
            raise TransferError(f"request {request_id}: the shm transport exports only the cache it "
                                "allocated (build the engine with kv_allocator=transport.allocate)")
        return self._exports.handle(
            self.name, self.node_id, kv_cache, request_id, block_ids, num_tokens,
            lambda slot, epoch: ShmRef(self.pool.name, kv_cache.shape[2], slot, epoch, list(block_ids)))

    def release(self, handle: KVHandle) -> None:
        if self._exports is not None:
            self._exports.release(handle.request_id, handle.payload.epoch)

    # -- destination side ----------------------------------------------------------------------

    def fetch(self, handle: KVHandle, kv_cache: torch.Tensor, block_ids: list[int],
              timeout_s: float) -> None:
        """Copy the handle's blocks into ``block_ids``. Never waits on the source, so it needs no
        timeout: it takes as long as the copy."""
        layout, dest = self._dest_view(kv_cache)  # cached: setup costs as much as a small copy
        rid, ref = handle.request_id, handle.payload
        check_fetch(handle, layout, self.node_id, block_ids, "in shared memory", "auto or ray")
        peer = self._peers.get(ref.pool, rid)
        if not peer.is_live(ref.slot, ref.epoch):
            raise self._peers.not_live(peer, rid)
        try:
            source = peer.blocks((*kv_cache.shape[:2], ref.pool_blocks, *kv_cache.shape[3:]),
                                 kv_cache.dtype)
            copy_blocks(source, ref.block_ids, dest, block_ids)
        except ValueError as exc:
            raise TransferError(f"request {rid}: {exc}") from exc
        if not peer.is_live(ref.slot, ref.epoch):
            raise TransferError(f"request {rid}: KV was released during the fetch (the source may "
                                "have reused its blocks); the copy is discarded")

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """End every export, unlink this instance's pool and drop peer mappings (the cache tensor
        stays usable). A peer still holding a mapping then fails its fetches instead of copying
        blocks the dying instance no longer guards."""
        if self.pool is not None:
            self._exports.clear()
            self.pool.unlink()
        self._peers.clear()
