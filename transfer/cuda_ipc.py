"""``cuda_ipc`` transport: KV between instances whose caches are on GPUs of one node, one
device-to-device copy, as DistServe moves it. NCCL cannot pair two ranks on one GPU, and within a
node GPUs copy peer to peer.

The source allocates its cache on its GPU and makes a CUDA IPC handle for it once (torch's own
recipe, ``reduce_tensor``); every handle carries it. A destination opens each source's cache
once (cached by the source's pool name) and copies the requested blocks straight into its own
cache on a side stream, one slice copy per run of consecutive blocks, then waits for the copy.
Fencing is the ``shm`` transport's: the source keeps an export epoch per live export in a small
shared-memory header (transfer/export_slots.py), and the destination checks it before and after
its copy, so a fetch that comes after ``release`` fails instead of copying reused blocks.

CUDA is touched only through ``share``/``open_shared``/``device_stream`` (tests give CPU
stand-ins); without CUDA, ``allocate`` raises a RuntimeError saying so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import msgspec
import torch

from tandem.transfer.base import TransferError, layout_of
from tandem.transfer.blockcopy import block_runs, check_ids
from tandem.transfer.export_slots import ExportSlots, PeerPools, check_fetch
from tandem.transfer.protocol import KVHandle
from tandem.transfer.shm_pool import SHM_DIR, SharedPool, pool_tag


class CudaIpcRef(msgspec.Struct, frozen=True):
    """Payload of a cuda_ipc handle: the source's cache (how to open it) and which export this is."""

    pool: str  # the shm file holding the source's export slots (names the source)
    share: Any  # how to open the source's cache in another process (torch's IPC recipe)
    slot: int
    epoch: int
    block_ids: list[int]


def share_cuda(cache: torch.Tensor) -> Any:
    """torch's recipe for opening ``cache`` from another process (a CUDA IPC handle inside)."""
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(cache)


def open_cuda(share: Any) -> torch.Tensor:
    rebuild, args = share
    return rebuild(*args)


class CudaIpcTransport:
    """Same-node GPU transport (see the module docstring)."""

    name = "cuda_ipc"

    @staticmethod
    def never_waits(handle: KVHandle) -> bool:
        """A fetch copies between two caches this process maps: it never waits on the source."""
        return True

    def __init__(self, node_id: str = "", directory: Path = SHM_DIR, device: str = "cuda",
                 share: Callable[[torch.Tensor], Any] = share_cuda,
                 open_shared: Callable[[Any], torch.Tensor] = open_cuda) -> None:
        self.node_id, self.directory, self.device = node_id, Path(directory), device
        self.share, self.open_shared = share, open_shared
        self.cache: torch.Tensor | None = None
        self._slots_pool: SharedPool | None = None
        self._exports: ExportSlots | None = None
        self._shared: Any = None
        self._peers = PeerPools(self.directory)  # sources' slot headers mapped so far
        self._opened: dict[str, torch.Tensor] = {}  # sources' caches opened so far, by pool name
        self._stream = None

    # -- source side ---------------------------------------------------------------------------

    def allocator_for(self, device: str):
        """``allocate`` for a GPU engine's cache (on ``device``); None for a CPU one."""
        if device == "cpu":
            return None
        self.device = device
        return self.allocate

    @property
    def cache_allocated(self) -> bool:
        return self.cache is not None

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The instance's zero-filled KV cache on its GPU (the engine's kv_allocator), shared once."""
        if self.cache is not None:
            raise RuntimeError("this transport already allocated its cache")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("the cuda_ipc transport needs a CUDA GPU (torch sees none); use "
                               "transfer backend shm, auto or ray for CPU instances")
        self.cache = torch.zeros(shape, dtype=dtype, device=self.device)
        num_slots = 2 * shape[2] + 16  # every live export holds a block; room for shared ones
        self._slots_pool = SharedPool((1,), torch.uint8, num_slots, pool_tag(self.node_id), self.directory)
        self._exports = ExportSlots(self._slots_pool.slots)
        self._shared = self.share(self.cache)
        return self.cache

    def owns(self, kv_cache: torch.Tensor) -> bool:
        return self.cache is not None and kv_cache is self.cache

    def export(self, kv_cache: torch.Tensor, request_id: str, block_ids: list[int],
               num_tokens: int) -> KVHandle:
        if not self.owns(kv_cache):
            raise TransferError(f"request {request_id}: the cuda_ipc transport exports only the "
                                "cache it allocated (build the engine with kv_allocator=transport.allocate)")
        return self._exports.handle(
            self.name, self.node_id, kv_cache, request_id, block_ids, num_tokens,
            lambda slot, epoch: CudaIpcRef(self._slots_pool.name, self._shared, slot, epoch, list(block_ids)))

    def release(self, handle: KVHandle) -> None:
        if self._exports is not None:
            self._exports.release(handle.request_id, handle.payload.epoch)

    # -- destination side ----------------------------------------------------------------------

    def fetch(self, handle: KVHandle, kv_cache: torch.Tensor, block_ids: list[int],
              timeout_s: float) -> None:
        """Copy the handle's blocks into ``block_ids`` of ``kv_cache``, device to device."""
        rid, ref = handle.request_id, handle.payload
        check_fetch(handle, layout_of(kv_cache), self.node_id, block_ids, "on a GPU", "nccl or ray")
        peer = self._peers.get(ref.pool, rid)
        if not peer.is_live(ref.slot, ref.epoch):
            if not peer.exists():
                self._opened.pop(ref.pool, None)  # the source shut down: let its cache go
            raise self._peers.not_live(peer, rid)
        source = self._source(ref, rid)
        try:
            check_ids(ref.block_ids, source.shape[2], "source")
            check_ids(block_ids, kv_cache.shape[2], "destination")
        except ValueError as exc:
            raise TransferError(f"request {rid}: {exc}") from exc
        self._copy(source, ref.block_ids, kv_cache, block_ids)
        if not peer.is_live(ref.slot, ref.epoch):
            raise TransferError(f"request {rid}: KV was released during the fetch (the source may "
                                "have reused its blocks); the copy is discarded")

    def _source(self, ref: CudaIpcRef, rid: str) -> torch.Tensor:
        """The source's cache, opened once per source."""
        source = self._opened.get(ref.pool)
        if source is None:
            try:
                source = self.open_shared(ref.share)
            except Exception as exc:  # a driver refusal, a source on a GPU this process cannot see
                raise TransferError(f"request {rid}: cannot open the source's KV cache: {exc}") from exc
            self._opened[ref.pool] = source
        return source

    def _copy(self, source: torch.Tensor, src_ids: list[int], dest: torch.Tensor, dst_ids: list[int]) -> None:
        """One slice copy per run of consecutive blocks, on a side stream, waited for."""
        runs = block_runs(src_ids, dst_ids)
        if dest.device.type != "cuda":
            for s, d, n in runs:
                dest[:, :, d:d + n].copy_(source[:, :, s:s + n])
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=dest.device)
        self._stream.wait_stream(torch.cuda.current_stream(dest.device))  # the reservation is ready
        with torch.cuda.stream(self._stream):
            for s, d, n in runs:
                dest[:, :, d:d + n].copy_(source[:, :, s:s + n], non_blocking=True)
        self._stream.synchronize()

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """End every export and unlink the slot header (peers' fetches then fail), and drop the
        sources' caches this process opened."""
        if self._slots_pool is not None:
            self._exports.clear()
            self._slots_pool.unlink()
        self._peers.clear()
        self._opened.clear()
