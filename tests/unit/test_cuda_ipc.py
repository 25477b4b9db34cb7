"""The cuda_ipc transport's protocol on CPU: its two CUDA calls (share a cache, open a shared one)
replaced by in-process stand-ins, everything else real: export epochs in a shared-memory header,
byte-exact block runs, late and racing fetches refused, a closed source reported as gone. The
real CUDA IPC, between two processes on one GPU, is the gpu-marked test at the end."""
from __future__ import annotations

import pytest
import torch

from tandem.transfer.auto import AutoTransport
from tandem.transfer.base import TransferError
from tandem.transfer.cuda_ipc import CudaIpcTransport
from tandem.transfer.hosting import cache_allocator
from tandem.transfer.shm import ShmTransport
from tests.unit.test_transfer import ID_CASES, bits, cache_shape, random_bits


def stand_in(node_id: str = "") -> CudaIpcTransport:
    """A cuda_ipc transport whose 'GPU' is the CPU and whose IPC handle is the tensor itself."""
    return CudaIpcTransport(node_id, device="cpu", share=lambda cache: cache, open_shared=lambda share: share)


@pytest.fixture
def pair():
    source, dest = stand_in(), stand_in()
    yield source, dest
    source.close()
    dest.close()


@pytest.mark.parametrize("src_ids, dst_ids", ID_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_fetch_copies_exactly_the_exported_blocks(pair, src_ids, dst_ids, dtype):
    source, dest = pair
    src = source.allocate(cache_shape(16), dtype)
    src.copy_(random_bits(16, dtype, seed=1))
    dst = dest.allocate(cache_shape(16), dtype)
    handle = source.export(src, "r", src_ids, num_tokens=4 * len(src_ids))
    assert CudaIpcTransport.never_waits(handle)
    dest.fetch(handle, dst, dst_ids, timeout_s=1)
    assert torch.equal(bits(dst[:, :, dst_ids]), bits(src[:, :, src_ids]))
    untouched = [i for i in range(16) if i not in dst_ids]
    assert not bits(dst[:, :, untouched]).any()
    source.release(handle)
    source.release(handle)  # idempotent


def test_late_and_racing_fetches_fail_instead_of_copying_reused_blocks(pair):
    source, dest = pair
    src, dst = source.allocate(cache_shape(8), torch.float32), dest.allocate(cache_shape(8), torch.float32)
    handle = source.export(src, "late", [1, 2], num_tokens=8)
    source.release(handle)
    with pytest.raises(TransferError, match="'?late'?: KV was released before the fetch"):
        dest.fetch(handle, dst, [0, 1], timeout_s=1)
    racing = source.export(src, "racing", [3], num_tokens=4)
    copy = dest._copy

    def release_mid_copy(*args):
        copy(*args)
        source.release(racing)  # the source lets go while the copy runs: it must not count

    dest._copy = release_mid_copy
    with pytest.raises(TransferError, match="released during the fetch"):
        dest.fetch(racing, dst, [4], timeout_s=1)
    again = source.export(src, "racing", [3], num_tokens=4)  # a new export, a new epoch
    assert again.payload.epoch != racing.payload.epoch


def test_refusals_name_the_request_and_the_problem(pair):
    source, dest = pair
    src = source.allocate(cache_shape(8), torch.float32)
    dst = dest.allocate(cache_shape(8), torch.bfloat16)
    handle = source.export(src, "r", [0, 1], num_tokens=8)
    with pytest.raises(TransferError, match="r: KV layout .* != destination"):
        dest.fetch(handle, dst, [0, 1], timeout_s=1)
    same = stand_in()
    other = same.allocate(cache_shape(8), torch.float32)
    with pytest.raises(TransferError, match="2 blocks exported, 3 reserved"):
        same.fetch(handle, other, [0, 1, 2], timeout_s=1)
    with pytest.raises(TransferError, match="destination block ids 7..9 outside 0..7"):
        same.fetch(handle, other, [7, 9], timeout_s=1)
    with pytest.raises(TransferError, match="already exported"):
        source.export(src, "r", [2], num_tokens=4)
    with pytest.raises(TransferError, match="exports only the cache it allocated"):
        source.export(other, "x", [0], num_tokens=4)
    elsewhere = stand_in("node-b")
    remote = stand_in("node-a")
    cache = remote.allocate(cache_shape(8), torch.float32)
    with pytest.raises(TransferError, match="on a GPU on node node-a, this instance is on node node-b"):
        elsewhere.fetch(remote.export(cache, "n", [0], 4), other, [0], timeout_s=1)
    source.close()
    with pytest.raises(TransferError, match="source KV pool .* is gone"):
        same.fetch(handle, other, [0, 1], timeout_s=1)
    for transport in (same, elsewhere, remote):
        transport.close()


def test_without_cuda_the_transport_says_it_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="cuda_ipc transport needs a CUDA GPU"):
        CudaIpcTransport().allocate(cache_shape(4), torch.float32)


def test_each_engine_gets_its_cache_from_a_transport_for_its_device():
    """shm makes CPU caches (host shared memory), cuda_ipc GPU ones, auto either."""
    shm, gpu, auto = ShmTransport(), CudaIpcTransport(), AutoTransport("")
    try:
        assert cache_allocator([gpu, shm], "cpu") == shm.allocate
        assert cache_allocator([shm, gpu], "cuda") == gpu.allocate and gpu.device == "cuda"
        assert cache_allocator([auto], "cpu") == auto.shm.allocate
        assert cache_allocator([auto], "cuda") == auto.gpu.allocate
        assert cache_allocator([shm], "cuda") is None  # the engine allocates on its GPU itself
    finally:
        for transport in (shm, gpu, auto):
            transport.close()


GPU_SHAPE = (2, 2, 8, 4, 2, 8)


def _fetch_in_child(handle, queue) -> None:
    """The destination, in another process: fetch the blocks into its own GPU cache."""
    try:
        dest = CudaIpcTransport()
        cache = dest.allocate(GPU_SHAPE, torch.float32)
        dest.fetch(handle, cache, [5, 6, 7], timeout_s=30)
        queue.put(cache[:, :, [5, 6, 7]].cpu())
        dest.close()
    except Exception as exc:  # reported to the parent, which fails the test with it
        queue.put(repr(exc))


@pytest.mark.gpu
def test_a_process_fetches_blocks_from_another_processs_gpu_cache():
    from benchmarks.gpu_transfer import in_spawned_process

    source = CudaIpcTransport()
    cache = source.allocate(GPU_SHAPE, torch.float32)
    cache.copy_(torch.randn(cache.shape, generator=torch.Generator().manual_seed(3)).cuda())
    torch.cuda.synchronize()
    handle = source.export(cache, "r", [0, 2, 3], num_tokens=12)
    got = in_spawned_process(_fetch_in_child, handle, timeout_s=120)
    assert torch.equal(got, cache[:, :, [0, 2, 3]].cpu())
    source.release(handle)
    source.close()
