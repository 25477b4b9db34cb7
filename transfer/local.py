"""In-process transport: the source keeps its blocks and the destination copies straight from the
source's cache tensor. Used by tests and as the memcpy reference in benchmarks."""
from __future__ import annotations

import torch

from transfer.base import TransferError, check_layout, gather_blocks, layout_of, scatter_blocks
from transfer.messages import KVHandle


class LocalTransport:
    name = "local"

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
        scatter_blocks(kv_cache, block_ids, gather_blocks(source, source_ids))

    def release(self, handle: KVHandle) -> None:
        self._exports.pop(handle.request_id, None)
