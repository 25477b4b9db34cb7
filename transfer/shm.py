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

import itertools
import time
from pathlib import Path

import msgspec
import torch

from tandem.transfer.base import TransferError, layout_of
from tandem.transfer.blockcopy import CacheView, copy_blocks
from tandem.transfer.protocol import KVHandle
from tandem.transfer.shm_pool import SHM_DIR, PeerPool, SharedPool, pool_tag

PRUNE_EVERY_S = 10.0  # how often a destination looks for source pools that vanished


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
        self._exports: dict[str, tuple[int, int]] = {}  # request id -> (slot, epoch)
        self._free_slots: list[int] = []
        self._epochs = itertools.count(1)
        self._peers: dict[str, PeerPool] = {}  # source pools mapped so far, by name
        self._next_prune = 0.0
        self._dest_view = CacheView()

    # -- source side ---------------------------------------------------------------------------

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The instance's zero-filled KV cache, in shared memory (the engine's kv_allocator)."""
        if self.pool is not None:
            raise RuntimeError(f"this transport already allocated pool {self.pool.name}")
        # Every live export holds at least one block; twice that leaves room for shared blocks.
        num_slots = 2 * shape[2] + 16
        self.pool = SharedPool(tuple(shape), dtype, num_slots, pool_tag(self.node_id), self.directory)
        self._free_slots = list(range(num_slots - 1, -1, -1))
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
        if request_id in self._exports:
            raise TransferError(f"request {request_id} is already exported")
        if not self._free_slots:
            raise TransferError(f"request {request_id}: all {self.pool.slots.size} export slots "
                                "are in use (exports are not being released)")
        slot, epoch = self._free_slots.pop(), next(self._epochs)
        self.pool.slots[slot] = epoch
        self._exports[request_id] = (slot, epoch)
        ref = ShmRef(self.pool.name, kv_cache.shape[2], slot, epoch, list(block_ids))
        return KVHandle(self.name, request_id, num_tokens, len(block_ids), layout_of(kv_cache),
                        payload=ref, node_id=self.node_id)

    def release(self, handle: KVHandle) -> None:
        entry = self._exports.get(handle.request_id)
        if entry is None or entry[1] != handle.payload.epoch:
            return  # already released (idempotent), or a stale handle of an earlier export
        del self._exports[handle.request_id]
        slot, _ = entry
        self.pool.slots[slot] = 0  # from here on fetches fail: the caller may free the blocks
        self._free_slots.append(slot)

    # -- destination side ----------------------------------------------------------------------

    def fetch(self, handle: KVHandle, kv_cache: torch.Tensor, block_ids: list[int],
              timeout_s: float) -> None:
        """Copy the handle's blocks into ``block_ids``. Never waits on the source, so it needs no
        timeout: it takes as long as the copy."""
        layout, dest = self._dest_view(kv_cache)  # cached: setup costs as much as a small copy
        rid, ref = handle.request_id, handle.payload
        if handle.layout != layout:
            raise TransferError(f"request {rid}: KV layout {handle.layout} != destination {layout}")
        if self.node_id and handle.node_id and handle.node_id != self.node_id:
            raise TransferError(f"request {rid}: KV is in shared memory on node {handle.node_id}, "
                                f"this instance is on node {self.node_id} (use backend auto or ray)")
        if len(block_ids) != len(ref.block_ids):
            raise TransferError(f"request {rid}: {len(ref.block_ids)} blocks exported, "
                                f"{len(block_ids)} reserved")
        peer = self._peer(ref.pool, rid)
        if not peer.is_live(ref.slot, ref.epoch):
            raise self._not_live(peer, rid)
        try:
            source = peer.blocks((*kv_cache.shape[:2], ref.pool_blocks, *kv_cache.shape[3:]),
                                 kv_cache.dtype)
            copy_blocks(source, ref.block_ids, dest, block_ids)
        except ValueError as exc:
            raise TransferError(f"request {rid}: {exc}") from exc
        if not peer.is_live(ref.slot, ref.epoch):
            raise TransferError(f"request {rid}: KV was released during the fetch (the source may "
                                "have reused its blocks); the copy is discarded")

    def _not_live(self, peer: PeerPool, rid: str) -> TransferError:
        if not peer.exists():  # the source shut down (closing releases every export)
            self._peers.pop(peer.name, None)  # our mapping alone would keep its memory
            return TransferError(f"request {rid}: source KV pool {peer.name} is gone (its "
                                 "instance shut down)")
        return TransferError(f"request {rid}: KV was released before the fetch")

    def _peer(self, name: str, rid: str) -> PeerPool:
        # A pool whose owner was killed (no close) stays mapped until a check notices its file is
        # gone; checking costs a syscall, so only now and then, not on every fetch.
        if time.monotonic() >= self._next_prune:
            self._drop_gone_peers()
        peer = self._peers.get(name)
        if peer is None:
            self._drop_gone_peers()
            try:
                peer = PeerPool(name, self.directory)
            except FileNotFoundError as exc:
                raise TransferError(f"request {rid}: source KV pool {name} is gone (its instance "
                                    "shut down)") from exc
            except (OSError, ValueError) as exc:
                raise TransferError(f"request {rid}: cannot map source KV pool {name}: {exc}") from exc
            self._peers[name] = peer
        return peer

    def _drop_gone_peers(self) -> None:
        for name in [n for n, p in self._peers.items() if not p.exists()]:
            del self._peers[name]
        self._next_prune = time.monotonic() + PRUNE_EVERY_S

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """End every export, unlink this instance's pool and drop peer mappings (the cache tensor
        stays usable). A peer still holding a mapping then fails its fetches instead of copying
        blocks the dying instance no longer guards."""
        if self.pool is not None:
            self.pool.slots[:] = 0
            self._exports.clear()
            self.pool.unlink()
        self._peers.clear()
