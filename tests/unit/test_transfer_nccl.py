"""The nccl transport's bookkeeping on CPU: a fake runtime whose communicators move real bytes
between CPU tensors by pointer (ctypes.memmove), so chunk pointers, sizes and send/recv order are
checked byte for byte; pairing, failure and cleanup are checked through the fake's records.
The real-GPU test at the end needs two CUDA devices (skipped here)."""
from __future__ import annotations

import contextlib
import ctypes
import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

import tandem.transfer.nccl as nccl_module
from tandem.transfer.base import TransferError
from tandem.transfer.nccl import NcclTransport

SHAPE = (3, 2, 16, 4, 2, 8)


class FakeComm:
    """Like NCCL: send/recv only enqueue; a recv completes when its event is polled and the
    matching send (same size, same order) has been posted."""

    def __init__(self, wire: "FakeWire", unique_id: tuple, rank: int) -> None:
        self.wire, self.unique_id, self.rank = wire, unique_id, rank
        self.aborted = False
        self.error: Exception | None = None
        self.pending: list[tuple[tuple, int, int]] = []  # (queue key, destination ptr, bytes)
        # Both peers' events poll every comm with pending receives (see FakeWire.record), so
        # two threads may progress one comm at once: take the head receive atomically.
        self._progress_lock = threading.Lock()

    def send(self, ptr: int, count: int, datatype: int, peer: int, stream: int) -> None:
        assert not self.aborted and datatype == FakeWire.uint8
        self.wire.queue((self.unique_id, self.rank, peer)).put((ptr, count))

    def recv(self, ptr: int, count: int, datatype: int, peer: int, stream: int) -> None:
        assert not self.aborted and datatype == FakeWire.uint8
        self.pending.append(((self.unique_id, peer, self.rank), ptr, count))

    def progress(self) -> bool:
        """Complete the recvs whose sends arrived; True when none is left."""
        with self._progress_lock:
            return self._progress_locked()

    def _progress_locked(self) -> bool:
        while self.pending and self.error is None:
            key, ptr, count = self.pending[0]
            try:
                src, n = self.wire.queue(key).get_nowait()
            except queue.Empty:
                return False
            if n != count:
                self.error = RuntimeError(f"send of {n} bytes matched a recv of {count}")
                return False
            ctypes.memmove(ptr, src, count)
            self.pending.pop(0)
        return not self.pending

    def check_async_error(self) -> None:
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        with self._progress_lock:
            self.aborted = True
            self.pending.clear()

    def destroy(self) -> None:
        self.abort()


class FakeWire:
    """Both ends' runtime: rendezvous per unique id, FIFO queues per (id, from, to)."""

    uint8 = 7

    def __init__(self) -> None:
        self.queues: dict = defaultdict(queue.Queue)
        self.barriers: dict = defaultdict(lambda: threading.Barrier(2))
        # Both ranks reach these maps from their own threads; a defaultdict's insert-on-miss runs
        # Python code, so two threads could each create their own barrier (or queue) for one key
        # and wait on it forever: the cause of this file's occasional "setup timed out".
        self._maps_lock = threading.Lock()
        self.comms: list[FakeComm] = []
        self.groups = 0
        self._ids = iter(range(1, 10**6))

    def queue(self, key: tuple) -> queue.Queue:
        with self._maps_lock:
            return self.queues[key]

    def barrier(self, unique_id: tuple) -> threading.Barrier:
        with self._maps_lock:
            return self.barriers[unique_id]

    def unique_id(self) -> tuple:
        return (next(self._ids),) * 4

    def communicator(self, unique_id: tuple, rank: int, device: torch.device) -> FakeComm:
        self.barrier(unique_id).wait(timeout=5)  # like ncclCommInitRank: both ranks or neither
        comm = FakeComm(self, unique_id, rank)
        self.comms.append(comm)
        return comm

    def group_start(self) -> None:
        self.groups += 1

    def group_end(self) -> None:
        pass

    def on_device(self, device: torch.device):
        return contextlib.nullcontext()

    def side_stream(self, device: torch.device):
        return SimpleNamespace(cuda_stream=0)

    def after_compute(self, stream, device) -> None:
        pass

    def record(self, stream):
        comms = [c for c in self.comms if c.pending]  # the ops this event waits for
        return SimpleNamespace(query=lambda: all(c.progress() for c in comms))


class Peers:
    """Stands in for Ray: a source 'actor' is its key; its serve_* run on other threads."""

    def __init__(self, wire: FakeWire) -> None:
        self.wire, self.by_key, self.dead = wire, {}, set()
        self.pool = ThreadPoolExecutor(4)

    def transport(self) -> NcclTransport:
        key = f"w{len(self.by_key)}"
        t = NcclTransport(runtime=self.wire, call_source=self.call, key=key, source_actor=key)
        self.by_key[key] = t
        return t

    def call(self, source: str, op: str, args: tuple):
        if source in self.dead:
            return Future()  # never answers
        return self.pool.submit(getattr(self.by_key[source], f"serve_{op}"), *args)


@pytest.fixture
def peers():
    p = Peers(FakeWire())
    yield p
    p.pool.shutdown(wait=False, cancel_futures=True)


def random_cache(dtype: torch.dtype, seed: int) -> torch.Tensor:
    nbytes = torch.Size(SHAPE).numel() * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return raw.view(dtype).reshape(SHAPE)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("src_ids,dst_ids", [
    ([1, 2, 3, 4, 5], [9, 10, 11, 12, 13]),
    ([7, 2, 9, 4, 0], [1, 3, 5, 7, 8]),
    ([4, 5, 6, 10, 11, 12, 13], [13, 12, 2, 3, 4, 0, 15]),
], ids=["run", "scattered", "mixed"])
def test_round_trip_is_byte_exact(peers, dtype, src_ids, dst_ids):
    source, dest = peers.transport(), peers.transport()
    src, dst = random_cache(dtype, 1), torch.zeros(SHAPE, dtype=dtype)
    handle = source.export(src, "r1", src_ids, 30)
    dest.fetch(handle, dst, dst_ids, timeout_s=5)
    for s, d in zip(src_ids, dst_ids):
        assert same_bits(dst[:, :, d], src[:, :, s])
    assert not dst[:, :, [b for b in range(16) if b not in dst_ids]].view(torch.uint8).any()
    assert all(q.empty() for q in peers.wire.queues.values())  # every send was received
    assert not any(c.pending for c in peers.wire.comms)


def test_chunks_are_batched_into_groups(peers, monkeypatch):
    monkeypatch.setattr(nccl_module, "MAX_OPS_PER_GROUP", 4)
    source, dest = peers.transport(), peers.transport()
    src, dst = random_cache(torch.float32, 2), torch.zeros(SHAPE)
    # 3 runs x 3 layers x K/V = 18 chunks per side -> 5 groups of at most 4 on each side.
    dest.fetch(source.export(src, "r1", [0, 1, 5, 9], 50), dst, [2, 3, 4, 10], 5)
    assert peers.wire.groups == 10
    assert same_bits(dst[:, :, [2, 3, 4, 10]], src[:, :, [0, 1, 5, 9]])


def test_communicators_are_created_once_per_pair(peers):
    source, dest, other = peers.transport(), peers.transport(), peers.transport()
    src = random_cache(torch.float32, 3)
    for i in range(3):
        dest.fetch(source.export(src, f"r{i}", [i], 10), torch.zeros(SHAPE), [i], 5)
    assert len(peers.wire.comms) == 2  # one per side of the (source, dest) pair
    other.fetch(source.export(src, "r9", [9], 10), torch.zeros(SHAPE), [0], 5)
    assert len(peers.wire.comms) == 4
    assert set(source._as_source) == {dest.key, other.key} and set(dest._as_dest) == {source.key}


def test_failed_transfer_aborts_the_pair_and_the_next_fetch_reconnects(peers):
    source, dest = peers.transport(), peers.transport()
    src, dst = random_cache(torch.float32, 4), torch.zeros(SHAPE)
    dest.fetch(source.export(src, "r1", [1], 10), dst, [1], 5)
    src_end, dst_end = sorted(peers.wire.comms, key=lambda c: c.rank)  # rank 0 is the source
    gone = source.export(src, "r2", [2], 10)
    source.release(gone)
    start = time.monotonic()
    with pytest.raises(TransferError, match="r2: the source did not send the KV .*released before"):
        dest.fetch(gone, dst, [2], 30)
    assert time.monotonic() - start < 2  # the source's refusal ends the wait, not the timeout
    assert dst_end.aborted and source.key not in dest._as_dest
    dest.fetch(source.export(src, "r3", [3], 10), dst, [3], 5)
    assert same_bits(dst[:, :, 3], src[:, :, 3])
    assert src_end.aborted and len(peers.wire.comms) == 4  # the source replaced its old end


def test_a_source_that_never_joins_times_out(peers):
    source, dest = peers.transport(), peers.transport()
    handle = source.export(random_cache(torch.float32, 5), "r1", [1], 10)
    peers.dead.add(source.key)
    start = time.monotonic()
    with pytest.raises(TransferError, match="r1: NCCL communicator setup timed out"):
        dest.fetch(handle, torch.zeros(SHAPE), [1], timeout_s=0.3)
    assert time.monotonic() - start < 2


def test_a_source_that_dies_mid_transfer_times_out(peers):
    source, dest = peers.transport(), peers.transport()
    src = random_cache(torch.float32, 6)
    dest.fetch(source.export(src, "r1", [1], 10), torch.zeros(SHAPE), [1], 5)  # paired
    handle = source.export(src, "r2", [2], 10)
    peers.dead.add(source.key)
    start = time.monotonic()
    with pytest.raises(TransferError, match="r2: NCCL recv did not complete in time"):
        dest.fetch(handle, torch.zeros(SHAPE), [2], timeout_s=0.5)
    # The deadline, not a hang, ended the wait (loose upper bound: no timed assertion on a loaded host).
    assert 0.45 <= time.monotonic() - start < 10
    assert source.key not in dest._as_dest


def test_out_of_range_ids_never_reach_nccl(peers):
    source, dest = peers.transport(), peers.transport()
    handle = source.export(random_cache(torch.float32, 7), "r1", [1, 2], 10)
    with pytest.raises(TransferError, match="destination block ids 15..16 outside 0..15"):
        dest.fetch(handle, torch.zeros(SHAPE), [15, 16], 5)
    assert not peers.wire.comms


def test_close_aborts_every_communicator(peers):
    source, dest = peers.transport(), peers.transport()
    dest.fetch(source.export(random_cache(torch.float32, 8), "r1", [1], 10), torch.zeros(SHAPE), [1], 5)
    source.close()
    dest.close()
    assert len(peers.wire.comms) == 2 and all(c.aborted for c in peers.wire.comms)


def test_without_cuda_the_backend_says_what_is_missing():
    from tandem.transfer.registry import make_transport

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="nccl needs CUDA and cupy with NCCL: torch sees no CUDA"):
        make_transport("nccl")


def test_launching_an_nccl_spec_without_cuda_fails_clearly():
    from tandem.cluster.deployment import launch_config
    from tandem.cluster.spec import parse_spec
    from tandem.cluster.spec_types import SpecError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    spec = parse_spec({"name": "g", "model": {"name": "no-such-model"}, "transfer": {"backend": "nccl"},
                       "prefill": {"device": "cuda"}, "decode": {"device": "cuda"}})
    with pytest.raises(SpecError, match="transfer.backend: nccl needs CUDA and cupy with NCCL"):
        launch_config(spec, "/nonexistent")


# --- real GPUs ----------------------------------------------------------------------------------

@pytest.mark.gpu
def test_two_gpus_round_trip_through_real_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    import ray

    @ray.remote(num_gpus=1)
    class Peer:
        def __init__(self) -> None:
            from tandem.transfer.registry import make_transport

            self.transport = make_transport("nccl")
            self.cache = torch.zeros(SHAPE, dtype=torch.bfloat16, device="cuda")

        def fill(self) -> None:
            self.cache.copy_(random_cache(torch.bfloat16, 9).cuda())

        def export(self, ids):
            return self.transport.export(self.cache, "r1", ids, 40)

        def fetch(self, handle, ids) -> None:
            self.transport.fetch(handle, self.cache, ids, 30)

        def blocks(self, ids) -> torch.Tensor:
            return self.cache[:, :, ids].cpu()

        def kv_source(self, name, op, *args):
            return getattr(self.transport, f"serve_{op}")(*args)

    ray.init(num_gpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    try:
        source, dest = Peer.options(max_concurrency=4).remote(), Peer.options(max_concurrency=4).remote()
        ray.get(source.fill.remote())
        handle = ray.get(source.export.remote([7, 2, 9, 4, 0]))
        ray.get(dest.fetch.remote(handle, [1, 3, 5, 7, 8]), timeout=120)
        assert same_bits(ray.get(dest.blocks.remote([1, 3, 5, 7, 8])),
                         ray.get(source.blocks.remote([7, 2, 9, 4, 0])))
    finally:
        ray.shutdown()
