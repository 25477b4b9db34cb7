"""In-process transport: the source keeps its blocks and the destination copies straight from the
source's cache tensor. Used by tests and as the memcpy reference in benchmarks."""
from __future__ import annotations

import torch

from tandem.transfer.base import TransferError, check_layout, gather_blocks, layout_of, scatter_blocks
from tandem.transfer.blockcopy import copy_blocks, raw_numpy
from tandem.transfer.protocol import KVHandle


class LocalTransport:
    """Source and destination in one process: one copy, source cache to destination cache."""

    name = "local"

    @staticmethod
    def never_waits(handle: KVHandle) -> bool:
        """A fetch copies from memory this process maps: it never waits on the source."""
        return True

    def __init__(self) -> None:
        self._exports: dict[str, tuple[torch.Tensor, list[int]]] = {}

    def export(self, kv_cache: torch.Tensor, request_id: str, block_ids: list[int],
               num_tokens: int) -> KVHandle:
        self._exports[request_id] = (kv_cache, list(block_ids))
        return KVHandle(self.name, request_id, num_tokens, len(block_ids), layout_of(kv_cache))

    def fetch(self, handle: KVHandle, kv_cache: torch.Tensor, block_ids: list[int],
              timeout_s: float) -> None:
        check_layout(handle, kv_cache)
        if handle.request_id not in self._exports:
            raise TransferError(f"request {handle.request_id}: KV was released before the fetch")
        source, source_ids = self._exports[handle.request_id]
        if len(source_ids) != len(block_ids):
            raise TransferError(f"request {handle.request_id}: {len(source_ids)} blocks exported, "
                                f"{len(block_ids)} reserved")
        try:
            if source.device.type == kv_cache.device.type == "cpu":
                copy_blocks(raw_numpy(source), source_ids, raw_numpy(kv_cache), block_ids)
            else:
                scatter_blocks(kv_cache, block_ids, gather_blocks(source, source_ids))
        except ValueError as exc:
            raise TransferError(f"request {handle.request_id}: {exc}") from exc

    def release(self, handle: KVHandle) -> None:
        self._exports.pop(handle.request_id, None)
