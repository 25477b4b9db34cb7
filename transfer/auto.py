"""``auto`` transport: between instances on one node, shared memory (CPU caches) or CUDA IPC (GPU
caches); the Ray object store across nodes.

The source exports through its same-node transport (``shm`` or ``cuda_ipc``, whichever allocated
its cache: bookkeeping only, no copy) and records its Ray node and its own actor handle in the
handle. A destination on the same node with a cache on the same kind of device fetches through
that transport: one copy. Any other destination asks the source actor for an object-store export
of that request (``kv_source("auto", "export", request_id)``, served by ``serve_export``) and
fetches that. The object-store export is made lazily, only when asked, so same-node transfers
never pay its two copies; it lives exactly as long as the same-node export (``release`` drops both).

A source whose cache neither allocated (an engine built without the allocator) exports through
the object store right away; any destination can fetch that.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import msgspec
import ray
import torch

from tandem.transfer.base import TransferError
from tandem.transfer.cuda_ipc import CudaIpcTransport
from tandem.transfer.protocol import KVHandle, remote_cause
from tandem.transfer.ray_transport import RayObjectTransport
from tandem.transfer.shm import ShmTransport


class AutoRef(msgspec.Struct, frozen=True):
    """Payload of an auto handle: exactly one of ``local`` (a same-node shm or cuda_ipc handle,
    with a lazy ray fallback) or ``ray`` is set."""

    local: KVHandle | None = None
    ray: KVHandle | None = None
    source: Any = None  # the source's actor handle, asked for an object-store export across nodes


class AutoTransport:
    """shm on the same node, the object store otherwise (see the module docstring)."""

    name = "auto"

    def __init__(self, node_id: str, source_actor: Any = None, shm: ShmTransport | None = None,
                 ray_transport: RayObjectTransport | None = None, gpu: CudaIpcTransport | None = None) -> None:
        self.node_id = node_id
        self.source_actor = source_actor
        self.shm = shm if shm is not None else ShmTransport(node_id)
        self.gpu = gpu if gpu is not None else CudaIpcTransport(node_id)  # used once it allocates
        self.ray = ray_transport if ray_transport is not None else RayObjectTransport()
        # export/release run on the step thread, serve_export on the actor's: one lock for both.
        self._lock = threading.Lock()
        self._held: dict[str, tuple[torch.Tensor, list[int], int]] = {}  # shm exports, by request
        self._remote: dict[str, KVHandle] = {}  # object-store exports made for other nodes
        self.remote_exports = 0  # how many cross-node fallbacks this source served

    def allocator_for(self, device: str):
        """The instance's cache: in shared memory for a CPU engine, on the GPU for a CUDA one."""
        return self.shm.allocator_for(device) or self.gpu.allocator_for(device)

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A CPU cache in shared memory (what ``allocator_for("cpu")`` gives)."""
        return self.shm.allocate(shape, dtype)

    def _local(self, name: str):
        return self.shm if name == self.shm.name else self.gpu

    # -- source side ---------------------------------------------------------------------------

    def export(self, kv_cache: torch.Tensor, request_id: str, block_ids: list[int],
               num_tokens: int) -> KVHandle:
        with self._lock:
            local = next((t for t in (self.shm, self.gpu) if t.owns(kv_cache)), None)
            if local is not None:
                inner = local.export(kv_cache, request_id, block_ids, num_tokens)
                self._held[request_id] = (kv_cache, list(block_ids), num_tokens)
                ref = AutoRef(local=inner, source=self.source_actor)
            else:
                inner = self.ray.export(kv_cache, request_id, block_ids, num_tokens)
                ref = AutoRef(ray=inner)
        return KVHandle(self.name, request_id, num_tokens, len(block_ids), inner.layout,
                        payload=ref, node_id=self.node_id)

    def serve_export(self, request_id: str) -> KVHandle:
        """An object-store export of a held request, for a destination on another node."""
        with self._lock:  # release waits: the blocks cannot be freed while they are packed
            if request_id in self._remote:
                return self._remote[request_id]
            if request_id not in self._held:
                raise TransferError(f"request {request_id}: KV was released before the fetch")
            kv_cache, block_ids, num_tokens = self._held[request_id]
            handle = self.ray.export(kv_cache, request_id, block_ids, num_tokens)
            self._remote[request_id] = handle
            self.remote_exports += 1
            return handle

    def release(self, handle: KVHandle) -> None:
        ref: AutoRef = handle.payload
        with self._lock:
            if ref.local is not None:
                self._held.pop(handle.request_id, None)
                self._local(ref.local.transport).release(ref.local)
                remote = self._remote.pop(handle.request_id, None)
                if remote is not None:
                    self.ray.release(remote)
            if ref.ray is not None:
                self.ray.release(ref.ray)

    # -- destination side ----------------------------------------------------------------------

    def never_waits(self, handle: KVHandle) -> bool:
        """Whether fetching ``handle`` only copies between caches this process maps (from a
        same-node source into a cache of this transport's): no wait on the source."""
        ref: AutoRef = handle.payload
        return (ref.local is not None and handle.node_id == self.node_id
                and self._local(ref.local.transport).cache_allocated)

    def fetch(self, handle: KVHandle, kv_cache: torch.Tensor, block_ids: list[int],
              timeout_s: float) -> None:
        ref: AutoRef = handle.payload
        if ref.ray is not None:
            self.ray.fetch(ref.ray, kv_cache, block_ids, timeout_s)
        elif handle.node_id == self.node_id and _same_kind(ref.local, kv_cache):
            self._local(ref.local.transport).fetch(ref.local, kv_cache, block_ids, timeout_s)
        else:
            start = time.monotonic()
            remote = self._ask_source(handle, timeout_s)
            remaining = max(0.0, timeout_s - (time.monotonic() - start))
            self.ray.fetch(remote, kv_cache, block_ids, remaining)

    def _ask_source(self, handle: KVHandle, timeout_s: float) -> KVHandle:
        rid, source = handle.request_id, handle.payload.source
        if source is None:
            raise TransferError(f"request {rid}: KV is in shared memory on node {handle.node_id}, "
                                f"this instance is on node {self.node_id}, and no source actor "
                                "was named to export it through the object store")
        call = source.kv_source.remote(self.name, "export", rid)
        try:
            return ray.get(call, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as exc:  # the late export is dropped on release
            raise TransferError(f"request {rid}: the source did not export the KV for another node "
                                f"within {timeout_s}s") from exc
        except ray.exceptions.RayError as exc:
            cause = remote_cause(exc)
            raise TransferError(f"request {rid}: the source could not export the KV for another "
                                f"node ({type(cause).__name__}: {cause})") from exc

    def close(self) -> None:
        self.shm.close()
        self.gpu.close()


def _same_kind(local: KVHandle, kv_cache: torch.Tensor) -> bool:
    """Whether a same-node handle's KV can be copied straight into ``kv_cache``: shared memory
    into a CPU cache, CUDA IPC into a GPU one."""
    return (local.transport == "cuda_ipc") == (kv_cache.device.type == "cuda")
