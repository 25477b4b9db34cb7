"""Copying KV blocks between caches (or a contiguous buffer) with as few and as large copies as
possible, on raw bytes.

``index_select`` + ``index_copy_`` costs several times a plain ``copy_`` (a temporary, then a
scattered write), while one slice copy per run of consecutive block ids on both sides runs at
``copy_`` speed (benchmarks/RESULTS.md, "KV transfer"). Caches are copied as raw-integer numpy
views: numpy reads read-only memory (a zero-copy object-store get, a read-only shared-memory
mapping) without the warning or copy torch would need, and raw integers carry bfloat16 bit-exactly.
"""
from __future__ import annotations

import numpy as np
import torch

from tandem.transfer.base import layout_of
from tandem.transfer.protocol import KVLayout

# Same-size integer dtype used to view each cache dtype as plain bytes numpy understands.
_RAW_TORCH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
RAW_NUMPY = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}

Run = tuple[int, int, int]  # (first source block, first destination block, number of blocks)


def raw_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A writable numpy view of a contiguous CPU tensor's bytes (same shape, no copy)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(f"need a contiguous CPU tensor, got {tensor.device} "
                         f"contiguous={tensor.is_contiguous()}")
    return tensor.view(_RAW_TORCH[tensor.element_size()]).numpy()


def raw_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(RAW_NUMPY[dtype.itemsize])


def block_runs(src_ids: list[int], dst_ids: list[int]) -> list[Run]:
    """Split a block mapping into runs that are consecutive on both sides."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks for {len(dst_ids)} destination blocks")
    runs: list[Run] = []
    for s, d in zip(src_ids, dst_ids):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            first_s, first_d, n = runs[-1]
            runs[-1] = (first_s, first_d, n + 1)
        else:
            runs.append((s, d, 1))
    return runs


def copy_blocks(src: np.ndarray, src_ids: list[int], dst: np.ndarray, dst_ids: list[int]) -> None:
    """``dst[:, :, dst_ids] = src[:, :, src_ids]`` (blocks axis 2), one slice copy per run."""
    if src.shape[3:] != dst.shape[3:] or src.shape[:2] != dst.shape[:2] or src.dtype != dst.dtype:
        raise ValueError(f"block shapes differ: source {src.shape} {src.dtype}, "
                         f"destination {dst.shape} {dst.dtype}")
    check_ids(src_ids, src.shape[2], "source")
    check_ids(dst_ids, dst.shape[2], "destination")
    for s, d, n in block_runs(src_ids, dst_ids):
        dst[:, :, d:d + n] = src[:, :, s:s + n]


def check_ids(ids: list[int], num_blocks: int, side: str) -> None:
    """Raise ValueError unless every id names a block of a cache with ``num_blocks`` blocks."""
    # Slices clip and negative indices wrap: a bad id would copy the wrong bytes silently.
    if ids and (min(ids) < 0 or max(ids) >= num_blocks):
        raise ValueError(f"{side} block ids {min(ids)}..{max(ids)} outside 0..{num_blocks - 1}")


def gather_into(src: np.ndarray, src_ids: list[int], out: np.ndarray) -> None:
    """Pack ``src``'s blocks, in order, into the contiguous ``out`` ``[L, 2, n, ...]``."""
    copy_blocks(src, src_ids, out, list(range(len(src_ids))))


class CacheView:
    """The layout and raw view of the last destination cache seen, reused across fetches: for a
    small transfer such per-call setup costs about as much as the copy."""

    def __init__(self) -> None:
        self._entry: tuple | None = None  # (key, layout, raw view); the view keeps the cache alive

    def __call__(self, kv_cache: torch.Tensor) -> tuple[KVLayout, np.ndarray]:
        key = (kv_cache.data_ptr(), tuple(kv_cache.shape), kv_cache.dtype)
        if self._entry is None or self._entry[0] != key:
            self._entry = (key, layout_of(kv_cache), raw_numpy(kv_cache))
        return self._entry[1], self._entry[2]
