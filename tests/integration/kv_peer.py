"""An instance stand-in for transport tests: one transport, one KV cache (allocated through the
transport when it allocates caches), and the ``kv_source`` entry point real instance actors have."""
from __future__ import annotations

import os
import warnings

import torch

from tandem.transfer.base import TransferError
from tandem.transfer.protocol import KVHandle


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random raw bits (NaN and inf patterns included): only a bit-exact copy reproduces them."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen).view(dtype).reshape(shape)


class KVPeer:
    """Wrapped with ``ray.remote`` by the tests; fetch errors come back as strings."""

    def __init__(self, backend: str, shape: tuple[int, ...], dtype: str) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        torch.set_num_threads(1)
        from tandem.transfer.registry import make_transport

        self.transport = make_transport(backend)
        self.dtype = getattr(torch, dtype)
        allocate = getattr(self.transport, "allocate", None)
        self.cache = allocate(shape, self.dtype) if allocate else torch.zeros(shape, dtype=self.dtype)

    def fill(self, seed: int) -> None:
        self.cache.copy_(random_bits(tuple(self.cache.shape), self.dtype, seed))

    def export(self, request_id: str, block_ids: list[int], num_tokens: int) -> KVHandle:
        return self.transport.export(self.cache, request_id, block_ids, num_tokens)

    def release(self, handle: KVHandle) -> None:
        self.transport.release(handle)

    def fetch(self, handle: KVHandle, block_ids: list[int], timeout_s: float = 10.0) -> str | None:
        """None on success, else the TransferError's message (any other error propagates)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # e.g. torch's non-writable-array warning
                self.transport.fetch(handle, self.cache, block_ids, timeout_s)
        except TransferError as exc:
            return str(exc)
        return None

    def blocks(self, block_ids: list[int]) -> bytes:
        return self.cache[:, :, block_ids].contiguous().view(torch.uint8).numpy().tobytes()

    def kv_source(self, transport: str, op: str, *args):
        return getattr(self.transport, f"serve_{op}")(*args)

    def info(self) -> dict:
        import ray

        shm = getattr(self.transport, "shm", self.transport)
        pool = getattr(shm, "pool", None)
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "pool": pool.name if pool is not None else None,
                "remote_exports": getattr(self.transport, "remote_exports", 0)}

    def close(self) -> None:
        getattr(self.transport, "close", lambda: None)()
