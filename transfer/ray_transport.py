"""Ray object-store transport: the source gathers a request's blocks into one contiguous buffer and
``ray.put``s it (zero-copy reads on the same node, Ray's object manager across nodes).

The buffer goes in as a raw-byte numpy view, never a cast: numpy has no bfloat16, and raw torch
tensors through the object store are several times slower than numpy views.
"""
from __future__ import annotations

import numpy as np
import ray
import torch

from transfer.base import TransferError, check_layout, gather_blocks, layout_of, scatter_blocks
from transfer.messages import KVHandle

# Same-size integer dtype used to view each cache dtype as plain bytes numpy understands.
_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def to_numpy_bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.contiguous().view(_RAW[tensor.element_size()]).numpy()


def from_numpy_bytes(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(array).view(dtype)


class RayObjectTransport:
    name = "ray"

    def __init__(self) -> None:
        self._refs: dict[str, ray.ObjectRef] = {}

    def export(self, kv_cache: torch.Tensor, request_id: str, block_ids: list[int],
               num_tokens: int) -> KVHandle:
        ref = ray.put(to_numpy_bytes(gather_blocks(kv_cache, block_ids).cpu()))
        self._refs[request_id] = ref  # the owner keeps the object alive until release
        return KVHandle(self.name, request_id, num_tokens, len(block_ids), layout_of(kv_cache),
                        payload=[ref], node_id=ray.get_runtime_context().get_node_id())

    def fetch(self, handle: KVHandle, kv_cache: torch.Tensor, block_ids: list[int],
              timeout_s: float) -> None:
        check_layout(handle, kv_cache)
        (ref,) = handle.payload  # wrapped in a list so Ray does not resolve it as an argument
        try:
            array = ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise TransferError(f"request {handle.request_id}: KV fetch timed out after {timeout_s}s") from exc
        except ray.exceptions.RayError as exc:
            raise TransferError(f"request {handle.request_id}: KV fetch failed ({type(exc).__name__}: {exc})") from exc
        scatter_blocks(kv_cache, block_ids, from_numpy_bytes(array, kv_cache.dtype))

    def release(self, handle: KVHandle) -> None:
        self._refs.pop(handle.request_id, None)
