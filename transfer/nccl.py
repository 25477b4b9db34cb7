"""``nccl`` transport (GPU): KV blocks move device to device over NCCL point-to-point calls.

Pairing: communicators are created lazily, one per (source worker, destination worker) pair and
direction. On its first fetch from a source, the destination draws a unique id and asks the source
actor to join a 2-rank communicator (``kv_source("nccl", "connect", key, id, timeout)``; source
rank 0, destination rank 1): the id travels through Ray, never through NCCL itself.

Per fetch the destination asks the source to send (``kv_source("nccl", "send", request_id, key,
destination block ids, timeout)``) and posts the matching receives. Both sides split the (source
id, destination id) mapping into the same runs of consecutive blocks and each run into one
contiguous chunk per (layer, K/V) of their own cache, so the i-th send and the i-th receive have
the same size; chunks go out in ``groupStart``/``groupEnd`` batches on a side stream that first
waits for the compute stream. No staging copies on either side.

Failure: every wait is bounded. NCCL's communicator init has no timeout, so it runs on a helper
thread the caller stops waiting for at the deadline (a late communicator is aborted); completion is
polled on a CUDA event, and the communicator's async error, until the deadline. A failed or timed
out transfer aborts that pair's communicator (after a partial group its state is unknown) and
raises ``TransferError``; the next fetch builds a fresh one. ``close`` aborts all of an instance's
communicators when it leaves (abort, not destroy: destroy waits for a peer that may be dead).
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from typing import Any, Callable, Protocol

import msgspec
import torch

from tandem.transfer.base import TransferError, check_layout, layout_of
from tandem.transfer.blockcopy import Run, block_runs, check_ids
from tandem.transfer.nccl_runtime import Communicator, CupyRuntime, NcclRuntime
from tandem.transfer.protocol import KVHandle, remote_cause

MAX_OPS_PER_GROUP = 1024  # both sides split identically; bounds one group's NCCL bookkeeping
POLL_S = 0.0005

Chunk = tuple[int, int]  # (device pointer, bytes)


class NcclRef(msgspec.Struct, frozen=True):
    """Payload of an nccl handle: who to ask for the bytes, and which blocks they are."""

    source_key: str
    block_ids: list[int]
    source: Any = None  # the source's actor handle


class PendingCall(Protocol):
    """A request to the source in flight (a Ray call, or a future in tests)."""

    def result(self, timeout: float) -> Any: ...
    def done(self) -> bool: ...


CallSource = Callable[[Any, str, tuple], PendingCall]  # (source actor, op, args) -> pending call


class _RayCall:
    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def result(self, timeout: float) -> Any:
        import ray

        return ray.get(self.ref, timeout=timeout)

    def done(self) -> bool:
        import ray

        return bool(ray.wait([self.ref], timeout=0)[0])


def ray_call(source: Any, op: str, args: tuple) -> PendingCall:
    """Ask a source actor to run ``serve_<op>`` of its nccl transport (see actor ``kv_source``)."""
    return _RayCall(source.kv_source.remote("nccl", op, *args))


def chunks(cache: torch.Tensor, runs: list[Run], side: int) -> list[Chunk]:
    """One contiguous chunk per (run, layer, K/V) of ``cache`` ``[L, 2, N, ...]``; ``side`` picks
    the run's source (0) or destination (1) block. Same order and sizes on both sides."""
    layers, two, num_blocks = cache.shape[:3]
    block_bytes = cache[0, 0, 0].numel() * cache.element_size()
    base, out = cache.data_ptr(), []
    for run in runs:
        first, count = run[side], run[2]
        for layer in range(layers):
            for kv in range(two):
                offset = ((layer * two + kv) * num_blocks + first) * block_bytes
                out.append((base + offset, count * block_bytes))
    return out


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _abort(comm: Communicator) -> None:
    try:
        comm.abort()
    except Exception:  # already aborted, or NCCL is in a bad state: nothing more to free
        pass


class NcclTransport:
    """GPU-to-GPU KV transfer over lazily paired NCCL communicators (see the module docstring)."""

    name = "nccl"

    def __init__(self, runtime: NcclRuntime | None = None, call_source: CallSource | None = None,
                 key: str = "", source_actor: Any = None) -> None:
        self.runtime = runtime if runtime is not None else CupyRuntime()
        self.call_source = call_source if call_source is not None else ray_call
        self.key = key or uuid.uuid4().hex  # this worker's name in its peers' tables
        self.source_actor = source_actor
        self._lock = threading.Lock()  # tables: step thread vs. serve_* threads
        self._held: dict[str, tuple[torch.Tensor, list[int]]] = {}
        self._device: torch.device | None = None
        self._as_source: dict[str, Communicator] = {}  # by destination key
        self._as_dest: dict[str, Communicator] = {}  # by source key
        self._send_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)

    # -- source side ---------------------------------------------------------------------------

    def export(self, kv_cache: torch.Tensor, request_id: str, block_ids: list[int],
               num_tokens: int) -> KVHandle:
        with self._lock:
            self._held[request_id] = (kv_cache, list(block_ids))
            self._device = kv_cache.device
        ref = NcclRef(self.key, list(block_ids), self.source_actor)
        return KVHandle(self.name, request_id, num_tokens, len(block_ids), layout_of(kv_cache),
                        payload=ref)

    def release(self, handle: KVHandle) -> None:
        with self._lock:
            self._held.pop(handle.request_id, None)

    def serve_connect(self, peer_key: str, unique_id: tuple[int, ...], timeout_s: float) -> None:
        """Join a destination's new communicator as rank 0 (replacing any older one with it)."""
        device = self._device if self._device is not None else torch.device("cuda")
        comm = self._init(unique_id, 0, device, time.monotonic() + timeout_s, f"peer {peer_key}")
        with self._lock:
            old = self._as_source.pop(peer_key, None)
            self._as_source[peer_key] = comm
        if old is not None:
            _abort(old)

    def serve_send(self, request_id: str, peer_key: str, dst_ids: list[int], timeout_s: float) -> None:
        """Send a held request's blocks to a destination that posts the matching receives."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            entry, comm = self._held.get(request_id), self._as_source.get(peer_key)
        if entry is None:
            raise TransferError(f"request {request_id}: KV was released before the fetch")
        if comm is None:
            raise TransferError(f"request {request_id}: no communicator with {peer_key}")
        cache, src_ids = entry
        runs = self._runs(request_id, cache, src_ids, dst_ids, side=0)
        with self._send_locks[peer_key]:  # a pair's sends must not interleave
            try:
                self._run(comm, "send", 1, cache, chunks(cache, runs, 0), deadline, request_id)
            except TransferError:
                self._drop(self._as_source, peer_key, comm)
                raise

    # -- destination side ----------------------------------------------------------------------

    def fetch(self, handle: KVHandle, kv_cache: torch.Tensor, block_ids: list[int],
              timeout_s: float) -> None:
        check_layout(handle, kv_cache)
        rid, ref = handle.request_id, handle.payload
        deadline = time.monotonic() + timeout_s
        runs = self._runs(rid, kv_cache, ref.block_ids, block_ids, side=1)
        comm = self._as_dest.get(ref.source_key) or self._connect(ref, kv_cache.device, deadline, rid)
        try:
            sending = self.call_source(ref.source, "send", (rid, self.key, list(block_ids), timeout_s))
            self._run(comm, "recv", 0, kv_cache, chunks(kv_cache, runs, 1), deadline, rid, sending)
            self._wait_call(sending, deadline, rid, "send the KV")
        except TransferError:
            self._drop(self._as_dest, ref.source_key, comm)
            raise

    def _connect(self, ref: NcclRef, device: torch.device, deadline: float, rid: str) -> Communicator:
        unique_id = self.runtime.unique_id()
        joining = self.call_source(ref.source, "connect", (self.key, unique_id, _left(deadline)))
        comm = self._init(unique_id, 1, device, deadline, f"request {rid}")
        try:
            self._wait_call(joining, deadline, rid, "join the communicator")
        except TransferError:
            _abort(comm)
            raise
        with self._lock:
            self._as_dest[ref.source_key] = comm
        return comm

    # -- shared --------------------------------------------------------------------------------

    @staticmethod
    def _runs(rid: str, cache: torch.Tensor, src_ids: list[int], dst_ids: list[int],
              side: int) -> list[Run]:
        # Out-of-range ids would become pointers outside the cache: check before any NCCL call.
        try:
            check_ids([src_ids, dst_ids][side], cache.shape[2], ["source", "destination"][side])
            return block_runs(src_ids, dst_ids)
        except ValueError as exc:
            raise TransferError(f"request {rid}: {exc}") from exc

    def _init(self, unique_id: tuple[int, ...], rank: int, device: torch.device, deadline: float,
              what: str) -> Communicator:
        box: dict[str, Any] = {}
        abandoned = threading.Event()

        def init() -> None:
            try:
                box["comm"] = self.runtime.communicator(unique_id, rank, device)
            except BaseException as exc:  # reported to the waiting caller below
                box["error"] = exc
            if abandoned.is_set() and "comm" in box:
                _abort(box["comm"])  # the caller gave up waiting: nobody will use it

        thread = threading.Thread(target=init, name="nccl-init", daemon=True)
        thread.start()
        thread.join(_left(deadline))
        if thread.is_alive():
            abandoned.set()
            raise TransferError(f"{what}: NCCL communicator setup timed out (the peer never joined)")
        if "error" in box:
            raise TransferError(f"{what}: NCCL communicator setup failed: {box['error']}") from box["error"]
        return box["comm"]

    def _run(self, comm: Communicator, op: str, peer: int, cache: torch.Tensor,
             chunk_list: list[Chunk], deadline: float, rid: str,
             peer_call: PendingCall | None = None) -> None:
        rt = self.runtime
        with rt.on_device(cache.device):
            stream = rt.side_stream(cache.device)
            rt.after_compute(stream, cache.device)
            call = getattr(comm, op)
            try:
                for start in range(0, len(chunk_list), MAX_OPS_PER_GROUP):
                    rt.group_start()
                    try:
                        for ptr, nbytes in chunk_list[start:start + MAX_OPS_PER_GROUP]:
                            call(ptr, nbytes, rt.uint8, peer, stream.cuda_stream)
                    finally:
                        rt.group_end()
            except Exception as exc:
                raise TransferError(f"request {rid}: NCCL {op} failed: {exc}") from exc
            event = rt.record(stream)
        self._wait_event(comm, event, deadline, rid, op, peer_call)

    def _wait_event(self, comm: Communicator, event: Any, deadline: float, rid: str, op: str,
                    peer_call: PendingCall | None) -> None:
        while not event.query():
            try:
                comm.check_async_error()
            except Exception as exc:
                raise TransferError(f"request {rid}: NCCL {op} failed: {exc}") from exc
            if peer_call is not None and peer_call.done():  # a source that refused fails us now
                self._wait_call(peer_call, deadline, rid, "send the KV")
                peer_call = None
            if time.monotonic() > deadline:
                raise TransferError(f"request {rid}: NCCL {op} did not complete in time")
            time.sleep(POLL_S)

    @staticmethod
    def _wait_call(call: PendingCall, deadline: float, rid: str, what: str) -> Any:
        try:
            return call.result(timeout=_left(deadline))
        except Exception as exc:  # a timeout, a dead source, or its own TransferError
            cause = remote_cause(exc)
            raise TransferError(f"request {rid}: the source did not {what} "
                                f"({type(cause).__name__}: {cause})") from exc

    def _drop(self, table: dict[str, Communicator], key: str, comm: Communicator) -> None:
        with self._lock:
            if table.get(key) is comm:
                del table[key]
        _abort(comm)

    def close(self) -> None:
        """Abort every communicator of this worker (it is leaving)."""
        with self._lock:
            comms = [*self._as_source.values(), *self._as_dest.values()]
            self._as_source.clear()
            self._as_dest.clear()
        for comm in comms:
            _abort(comm)
