"""engine.hugepages: large CPU buffers on (transparent) huge pages, small ones as usual."""
from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest
import torch

from tandem.engine import hugepages

THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
THP_DEFRAG = Path("/sys/kernel/mm/transparent_hugepage/defrag")


def _thp_mode(path: Path = THP_ENABLED) -> str | None:
    """The bracketed choice of a THP sysfs switch ("always", "madvise", "never"), None without THP."""
    try:
        match = re.search(r"\[(\w[\w+]*)\]", path.read_text())
    except OSError:
        return None
    return match[1] if match else None


def _anon_huge_bytes(address: int) -> int:
    """AnonHugePages of the mapping (VMA) of this process holding ``address``, in bytes."""
    current = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            current = int(head[1], 16) <= address < int(head[2], 16)
        elif current and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


def _needs_madvised_thp() -> None:
    if not hugepages.enabled():
        pytest.skip("no MADV_HUGEPAGE here (or TANDEM_HUGEPAGES=0)")
    mode = _thp_mode()
    if mode not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {mode or 'not available'} on this kernel")
    # Under defrag "never" a fault takes a huge page only if one happens to be free: no promise.
    if _thp_mode(THP_DEFRAG) == "never":
        pytest.skip("THP defrag is 'never': madvised faults do not wait for a huge page")


def test_large_buffer_is_backed_by_huge_pages() -> None:
    """What the module is for: a madvised large buffer is faulted in as 2 MB pages, all of it
    (zeros() touches every page; with defrag madvise/always the fault compacts if it must)."""
    _needs_madvised_thp()
    t = hugepages.zeros((3, 1 << 20), torch.float32)  # 12 MB: six huge pages
    nbytes = t.numel() * t.element_size()
    assert _anon_huge_bytes(t.data_ptr()) >= nbytes


def test_plain_buffers_stay_on_small_pages_under_madvise(monkeypatch) -> None:
    """Under THP "madvise" only advised memory gets huge pages, so the huge pages of the test
    above are this module's doing: switched off, the same buffer is ordinary 4 KB pages."""
    _needs_madvised_thp()
    if _thp_mode() != "madvise":
        pytest.skip("THP is 'always': every large anonymous mapping may get huge pages")
    monkeypatch.setenv("TANDEM_HUGEPAGES", "0")
    # Large enough for glibc to mmap it on its own, so no neighbouring allocation shares the VMA.
    t = hugepages.zeros((3, 1 << 20), torch.float32)
    assert _anon_huge_bytes(t.data_ptr()) == 0


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


def test_copy_of_is_contiguous_equal_and_on_huge_pages() -> None:
    src = torch.randn(1024, 1536).t()  # 6 MB, not contiguous
    out = hugepages.copy_of(src)
    assert out.is_contiguous() and torch.equal(out, src)
    src.fill_(0)
    assert out.abs().sum() > 0  # a copy, not a view
    _needs_madvised_thp()
    assert out.data_ptr() % hugepages.HUGE_PAGE == 0
    assert _anon_huge_bytes(out.data_ptr()) >= out.numel() * out.element_size()


def test_small_buffers_and_switched_off_use_plain_tensors(monkeypatch) -> None:
    small = hugepages.zeros((4, 4), torch.bfloat16)
    assert small.dtype == torch.bfloat16 and int(small.count_nonzero()) == 0
    monkeypatch.setenv("TANDEM_HUGEPAGES", "0")
    assert not hugepages.enabled()
    big = hugepages.zeros((1 << 21,), torch.float32)
    assert int(big.count_nonzero()) == 0 and big.numel() == 1 << 21
