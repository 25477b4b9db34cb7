"""Keep freed CPU memory mapped, so each step's large transient tensors reuse their pages.

Why: a prefill allocates and frees hundreds of MB of activations, several MB a tensor, layer after
layer. glibc hands the top of its heap back to the OS whenever more than its trim threshold (twice
the largest block it recently freed) lies free there, so the next layer's tensors come back as
fresh pages, faulted in one at a time. With the thresholds fixed (blocks up to 32 MB from the heap,
glibc's own largest choice; trim only beyond 1 GB free) they stay mapped, for a little more
resident memory. Blocks above 32 MB are still mmapped: with a higher threshold glibc grew its heap
by each 64-byte-aligned large block freed and allocated again. Measurements: benchmarks/RESULTS.md,
"engine/heap.py".

Process-wide, once, glibc only (``mallopt`` elsewhere is absent or a no-op).
``TANDEM_KEEP_FREED_MEMORY=0`` leaves malloc alone.
"""
from __future__ import annotations

import ctypes
import functools
import os

# glibc's <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
HEAP_BLOCK_LIMIT = 32 << 20  # largest block served from the heap
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept before returning it


@functools.cache
def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds; returns whether they were set."""
    if os.environ.get("TANDEM_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.restype, mallopt.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int]
    # Each call returns 1 on success. Setting either stops glibc adjusting both by itself.
    return mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
