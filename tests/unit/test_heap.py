"""Freed activations stay mapped (engine.heap): a prefill-sized block comes from glibc's heap and
its pages stay there when it is freed, instead of being unmapped and faulted in again next layer."""
from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from tandem.engine import heap

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def _libc():
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def _layer_round(libc, size: int, count: int) -> tuple[MallInfo2, MallInfo2, MallInfo2]:
    """malloc, touch and free `count` blocks as a prefill layer does; mallinfo2 before, while
    they are held, and after."""
    before = libc.mallinfo2()
    blocks = [libc.malloc(size) for _ in range(count)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    held = libc.mallinfo2()
    for block in blocks:
        libc.free(block)
    return before, held, libc.mallinfo2()


def test_freed_prefill_sized_blocks_stay_in_the_heap() -> None:
    assert heap.keep_freed_memory()
    libc = _libc()
    size = 24 << 20  # one chunk of a prefill's MLP activation
    for _ in range(2):
        before, held, after = _layer_round(libc, size, 3)
        assert held.hblkhd == before.hblkhd, "served by mmap, so unmapped again on free"
        # Without the fix glibc returns the heap's free top to the OS beyond twice the largest
        # block it recently freed (here 72 MB > 48 MB), so the next layer's tensors are fresh pages.
        assert after.arena >= held.arena, "the heap was trimmed"


def test_blocks_beyond_the_heap_limit_do_not_grow_the_heap() -> None:
    """Above 32 MB glibc still maps and unmaps each block. With a higher limit it grew the heap by
    each 64-byte-aligned 50 MB block freed and allocated again (torch's allocations are aligned)."""
    assert heap.keep_freed_memory()
    libc = _libc()

    def one_round() -> None:
        t = torch.empty(50 << 18)  # 50 MB of float32
        t.fill_(1.0)
        small = torch.empty(1 << 18)
        small.fill_(1.0)
        del t

    one_round()
    start = libc.mallinfo2().arena
    for _ in range(5):
        one_round()
    assert libc.mallinfo2().arena - start < 50 << 20
