"""Ray object-store transport: the source packs a request's blocks into one contiguous buffer and
``ray.put``s it (zero-copy reads on the same node, Ray's object manager across nodes).

The buffer goes in as a raw-byte numpy view, never a cast: numpy has no bfloat16, and raw torch
tensors through the object store are several times slower than numpy views. Source: one packing
copy into a reused staging buffer (fresh pages for every request would cost more than the copy),
then the put's copy into the store. Destination: ``ray.get`` returns a read-only view of the
store's memory, copied once, run by run, into the reserved blocks (transfer/blockcopy.py).
"""
from __future__ import annotations

import warnings
from math import prod

import numpy as np
import ray
import torch

from tandem.transfer.base import TransferError, check_layout, gather_blocks, layout_of, scatter_blocks
from tandem.transfer.blockcopy import CacheView, copy_blocks, gather_into, raw_dtype, raw_numpy
from tandem.transfer.protocol import KVHandle


class RayObjectTransport:
    """Moves KV through the Ray object store; see the module docstring."""

    name = "ray"

    def __init__(self) -> None:
        self._refs: dict[str, ray.ObjectRef] = {}
        self._staging = np.empty(0, np.uint8)  # grown to the largest export, reused
        self._dest_view = CacheView()

    def export(self, kv_cache: torch.Tensor, request_id: str, block_ids: list[int],
               num_tokens: int) -> KVHandle:
        ref = ray.put(self._pack(kv_cache, block_ids))  # copies: the staging buffer is free again
        self._refs[request_id] = ref  # the owner keeps the object alive until release
        return KVHandle(self.name, request_id, num_tokens, len(block_ids), layout_of(kv_cache),
                        payload=[ref], node_id=ray.get_runtime_context().get_node_id())

    def _pack(self, kv_cache: torch.Tensor, block_ids: list[int]) -> np.ndarray:
        shape = (*kv_cache.shape[:2], len(block_ids), *kv_cache.shape[3:])
        if kv_cache.device.type != "cpu":  # one device-side gather, one copy to the host
            return raw_numpy(gather_blocks(kv_cache, block_ids).cpu())
        nbytes = prod(shape) * kv_cache.element_size()
        if self._staging.size < nbytes:
            self._staging = np.empty(nbytes, np.uint8)
        out = self._staging[:nbytes].view(raw_dtype(kv_cache.dtype)).reshape(shape)
        gather_into(raw_numpy(kv_cache), block_ids, out)
        return out

    def fetch(self, handle: KVHandle, kv_cache: torch.Tensor, block_ids: list[int],
              timeout_s: float) -> None:
        if kv_cache.device.type == "cpu":
            layout, dest = self._dest_view(kv_cache)
            if handle.layout != layout:
                raise TransferError(f"request {handle.request_id}: KV layout {handle.layout} != "
                                    f"destination {layout}")
        else:
            check_layout(handle, kv_cache)
        (ref,) = handle.payload  # wrapped in a list so Ray does not resolve it as an argument
        try:
            array = ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise TransferError(f"request {handle.request_id}: KV fetch timed out after {timeout_s}s") from exc
        except ray.exceptions.RayError as exc:
            raise TransferError(f"request {handle.request_id}: KV fetch failed ({type(exc).__name__}: {exc})") from exc
        if array.shape[2] != len(block_ids):
            raise TransferError(f"request {handle.request_id}: {array.shape[2]} blocks exported, "
                                f"{len(block_ids)} reserved")
        try:
            if kv_cache.device.type == "cpu":
                copy_blocks(array, list(range(len(block_ids))), dest, block_ids)
            else:
                scatter_blocks(kv_cache, block_ids, _readonly_tensor(array).view(kv_cache.dtype))
        except ValueError as exc:
            raise TransferError(f"request {handle.request_id}: {exc}") from exc

    def release(self, handle: KVHandle) -> None:
        self._refs.pop(handle.request_id, None)


def _readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over a read-only array that is only ever read (here: copied to a device)."""
    with warnings.catch_warnings():  # torch cannot mark a tensor read-only, so it warns
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
