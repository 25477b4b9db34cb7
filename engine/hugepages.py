"""Large CPU buffers (packed weights, the KV cache) on transparent huge pages.

Why: a decode step reads every weight and every cached K/V row, hundreds of MB scattered over
4 KB pages; TLB misses then cost as much as some of the reads. Linux backs a private anonymous
mapping advised ``MADV_HUGEPAGE`` with 2 MB pages whenever THP is ``always`` or ``madvise`` (the
common default), without the process-wide switch torch offers (``THP_MEM_ALLOC_ENABLE``, read
once at torch's first allocation). The measured gain is small (benchmarks/RESULTS.md,
"engine/hugepages.py").

Buffers below one huge page, other devices, and systems without ``madvise`` get ``torch.empty``.
``TANDEM_HUGEPAGES=0`` turns this off.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os

import torch

HUGE_PAGE = 2 << 20


def enabled() -> bool:
    return os.environ.get("TANDEM_HUGEPAGES", "1") != "0" and hasattr(mmap, "MADV_HUGEPAGE")


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE or not enabled():
        return torch.empty(shape, dtype=dtype)
    # Private, not mmap's default MAP_SHARED: shared anonymous memory is shmem, which THP skips.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    offset = -address % HUGE_PAGE  # start on a huge-page boundary: no 4 KB pages at the front
    region.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)
    # frombuffer keeps `region` alive for as long as the tensor (and its views) live.
    flat = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(dtype).view(shape)


def zeros(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Zeros, written now: faulting the pages in here keeps that cost out of the first steps."""
    return empty(shape, dtype).zero_()


def copy_of(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a CPU tensor, on huge pages when it is large enough."""
    out = empty(tensor.shape, tensor.dtype)
    out.copy_(tensor)
    return out
