"""KV block allocator: fixed-size blocks, a free list, reference counts, per-request block tables.

Check-then-act: callers ask ``can_allocate`` / ``can_append`` before ``allocate`` / ``append_slot``,
which raise if the check would have failed (a scheduler bug, never a silent over-commit).
A block returns to the free list when its reference count drops to zero, so a block shared with
another owner (e.g. a transfer in flight) survives the first ``free``.
"""
from __future__ import annotations

from collections import deque


class OutOfBlocksError(RuntimeError):
    """An allocation was attempted without a successful check."""


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self.tables: dict[str, list[int]] = {}  # request id -> block ids in token order

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, num_tokens: int) -> bool:
        return blocks_needed(num_tokens, self.block_size) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Give a new request enough blocks for `num_tokens` tokens."""
        if request_id in self.tables:
            raise ValueError(f"request {request_id!r} already holds blocks")
        need = blocks_needed(num_tokens, self.block_size)
        if need > len(self._free):
            raise OutOfBlocksError(f"need {need} blocks, {len(self._free)} free")
        self.tables[request_id] = [self._take() for _ in range(need)]
        return self.tables[request_id]

    def can_append(self, request_id: str, num_tokens: int) -> bool:
        """Whether the request can grow to `num_tokens` tokens."""
        extra = blocks_needed(num_tokens, self.block_size) - len(self.tables[request_id])
        return extra <= len(self._free)

    def append_slot(self, request_id: str, num_tokens: int) -> None:
        """Grow the request's table so that it covers `num_tokens` tokens."""
        if not self.can_append(request_id, num_tokens):
            raise OutOfBlocksError(f"request {request_id!r} cannot grow to {num_tokens} tokens")
        table = self.tables[request_id]
        while len(table) * self.block_size < num_tokens:
            table.append(self._take())

    def share(self, block_ids: list[int]) -> None:
        """Add a reference to blocks another owner must keep alive (undo with `release`)."""
        for block in block_ids:
            if self._refs[block] < 1:
                raise ValueError(f"block {block} is free and cannot be shared")
            self._refs[block] += 1

    def release(self, block_ids: list[int]) -> None:
        for block in block_ids:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)
            elif self._refs[block] < 0:
                raise RuntimeError(f"block {block} released more often than referenced")

    def free(self, request_id: str) -> None:
        """Drop the request's table; idempotent so every exit path may call it."""
        table = self.tables.pop(request_id, None)
        if table:
            self.release(table)

    def slot(self, request_id: str, position: int) -> int:
        table = self.tables[request_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def _take(self) -> int:
        block = self._free.popleft()
        self._refs[block] = 1
        return block
