"""Export epochs and peer pools, shared by the transports whose destination reads the source's
cache directly (``shm``: a shared-memory mapping; ``cuda_ipc``: a CUDA IPC mapping).

The source keeps one slot per live export in its pool's shared-memory header and writes a fresh
epoch into it (a counter starting at 1, never reused); ``release`` writes 0 before the caller
frees the blocks. A destination checks ``slot == epoch`` before and after its copy (a seqlock
read): transfer/shm.py's docstring says why that makes a late fetch fail instead of copying a
reused block.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tandem.transfer.base import TransferError, layout_of
from tandem.transfer.protocol import KVHandle, KVLayout
from tandem.transfer.shm_pool import PeerPool

PRUNE_EVERY_S = 10.0  # how often a destination looks for source pools that vanished


class ExportSlots:
    """The source's side: which export holds which slot, under which epoch."""

    def __init__(self, slots: np.ndarray) -> None:
        self.slots = slots  # the pool header's int64 slots (0: free or released)
        self._free = list(range(slots.size - 1, -1, -1))
        self._epochs = itertools.count(1)
        self._exports: dict[str, tuple[int, int]] = {}  # request id -> (slot, epoch)

    def take(self, request_id: str) -> tuple[int, int]:
        """A slot and a fresh epoch for a new export of ``request_id`` (TransferError if it is
        exported already or every slot is taken)."""
        if request_id in self._exports:
            raise TransferError(f"request {request_id} is already exported")
        if not self._free:
            raise TransferError(f"request {request_id}: all {self.slots.size} export slots are in "
                                "use (exports are not being released)")
        slot, epoch = self._free.pop(), next(self._epochs)
        self.slots[slot] = epoch
        self._exports[request_id] = (slot, epoch)
        return slot, epoch

    def handle(self, transport: str, node_id: str, kv_cache, request_id: str, block_ids: list[int],
               num_tokens: int, ref_for: Callable[[int, int], Any]) -> KVHandle:
        """A new export's handle: a slot and an epoch taken for it, its payload ``ref_for(slot,
        epoch)``."""
        slot, epoch = self.take(request_id)
        return KVHandle(transport, request_id, num_tokens, len(block_ids), layout_of(kv_cache),
                        payload=ref_for(slot, epoch), node_id=node_id)

    def release(self, request_id: str, epoch: int) -> None:
        """End that export (idempotent; a stale handle of an earlier export changes nothing):
        from here on fetches fail, and the caller may free the blocks."""
        entry = self._exports.get(request_id)
        if entry is None or entry[1] != epoch:
            return
        del self._exports[request_id]
        self.slots[entry[0]] = 0
        self._free.append(entry[0])

    def clear(self) -> None:
        """End every export (the instance is shutting down)."""
        self.slots[:] = 0
        self._exports.clear()


class PeerPools:
    """The destination's side: source pools mapped so far, by name, dropped once gone."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._peers: dict[str, PeerPool] = {}
        self._next_prune = 0.0

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, name: str, rid: str) -> PeerPool:
        """The mapped pool ``name`` (mapping it on first use); TransferError if it is gone."""
        # A pool whose owner was killed (no close) stays mapped until a check notices its file is
        # gone; checking costs a syscall, so only now and then, not on every fetch.
        if time.monotonic() >= self._next_prune:
            self._drop_gone()
        peer = self._peers.get(name)
        if peer is None:
            self._drop_gone()
            try:
                peer = PeerPool(name, self.directory)
            except FileNotFoundError as exc:
                raise TransferError(f"request {rid}: source KV pool {name} is gone (its instance "
                                    "shut down)") from exc
            except (OSError, ValueError) as exc:
                raise TransferError(f"request {rid}: cannot map source KV pool {name}: {exc}") from exc
            self._peers[name] = peer
        return peer

    def not_live(self, peer: PeerPool, rid: str) -> TransferError:
        """The error for an export found released (or a source that shut down)."""
        if not peer.exists():  # the source shut down (closing releases every export)
            self._peers.pop(peer.name, None)  # our mapping alone would keep its memory
            return TransferError(f"request {rid}: source KV pool {peer.name} is gone (its "
                                 "instance shut down)")
        return TransferError(f"request {rid}: KV was released before the fetch")

    def forget(self, name: str) -> None:
        self._peers.pop(name, None)

    def clear(self) -> None:
        self._peers.clear()

    def _drop_gone(self) -> None:
        for name in [n for n, p in self._peers.items() if not p.exists()]:
            del self._peers[name]
        self._next_prune = time.monotonic() + PRUNE_EVERY_S


def check_fetch(handle: KVHandle, layout: KVLayout, node_id: str, block_ids: list[int],
                kept: str, instead: str) -> None:
    """What a fetch that reads the source's cache directly checks first: the layouts match, the
    source is on this node (where the KV is ``kept``; else use backend ``instead``), and as many
    blocks are reserved as were exported. TransferError naming the request otherwise."""
    rid = handle.request_id
    if handle.layout != layout:
        raise TransferError(f"request {rid}: KV layout {handle.layout} != destination {layout}")
    if node_id and handle.node_id and handle.node_id != node_id:
        raise TransferError(f"request {rid}: KV is {kept} on node {handle.node_id}, this instance is "
                            f"on node {node_id} (use backend {instead})")
    if len(block_ids) != len(handle.payload.block_ids):
        raise TransferError(f"request {rid}: {len(handle.payload.block_ids)} blocks exported, "
                            f"{len(block_ids)} reserved")
