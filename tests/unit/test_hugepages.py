"""engine.hugepages: large CPU buffers on (transparent) huge pages, small ones as usual."""
from __future__ import annotations

import gc

import pytest
import torch

from tandem.engine import hugepages


def test_large_buffer_is_aligned_usable_and_outlives_its_views() -> None:
    if not hugepages.enabled():
        pytest.skip("no MADV_HUGEPAGE here")
    t = hugepages.zeros((3, 1 << 20), torch.float32)  # 12 MB
    assert t.shape == (3, 1 << 20) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0
    assert int(t.count_nonzero()) == 0
    t[1].fill_(2.5)
    view = t[1, 10:20]
    del t
    gc.collect()
    assert view.tolist() == [2.5] * 10  # the mapping lives as long as any view of it


def test_copy_of_is_contiguous_and_equal() -> None:
    src = torch.randn(1024, 1536).t()  # 6 MB, not contiguous
    out = hugepages.copy_of(src)
    assert out.is_contiguous() and torch.equal(out, src)
    src.fill_(0)
    assert out.abs().sum() > 0  # a copy, not a view


def test_small_buffers_and_switched_off_use_plain_tensors(monkeypatch) -> None:
    small = hugepages.zeros((4, 4), torch.bfloat16)
    assert small.dtype == torch.bfloat16 and int(small.count_nonzero()) == 0
    monkeypatch.setenv("TANDEM_HUGEPAGES", "0")
    assert not hugepages.enabled()
    big = hugepages.zeros((1 << 21,), torch.float32)
    assert int(big.count_nonzero()) == 0 and big.numel() == 1 << 21
