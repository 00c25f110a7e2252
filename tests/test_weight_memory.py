"""attnkit.quant.weight_memory: weight blocks carved from 2 MiB-aligned huge-page chunks."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from attnkit.quant import weight_memory as wm


def _thp_madvise() -> bool:
    p = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return p.exists() and "[never]" not in p.read_text()


def _region_huge_kb(addr: int) -> int | None:
    """AnonHugePages of the mapping that holds ``addr`` (None: not found)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            if lo <= addr < hi:
                for follow in lines[i + 1:]:
                    if follow.startswith("AnonHugePages:"):
                        return int(follow.split()[1])
                return None
    return None


def test_small_tensors_come_from_the_heap():
    t = wm.empty_weights((16, 34))
    assert t.shape == (16, 34) and t.dtype == torch.uint8 and t.is_contiguous()
    assert t.nbytes < wm.MIN_BYTES


def test_carved_tensors_are_aligned_disjoint_and_outlive_their_chunk():
    shapes = [(256, 1152), (1024, 576), (4, 34 * 1024), (300, 1000)] * 12  # ~16 MiB: more than one chunk's room
    ts = [wm.empty_weights(s) for s in shapes]
    for i, t in enumerate(ts):
        assert t.is_contiguous() and t.shape == shapes[i] and t.data_ptr() % wm.ALIGN == 0
        t.fill_(i % 251)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in ts)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "carved tensors overlap"
    for _ in range(3):  # later allocations move the allocator on to new chunks; the earlier tensors stay valid
        wm.empty_weights((wm.CHUNK // 2 - 4096,))
    gc.collect()
    assert all(bool((t == i % 251).all()) for i, t in enumerate(ts))


def test_other_dtypes_and_like():
    src = torch.zeros(512, 256, dtype=torch.float32)
    t = wm.empty_weights_like(src)
    assert t.shape == src.shape and t.dtype == torch.float32 and t.data_ptr() % wm.ALIGN == 0
    t.copy_(torch.arange(t.numel(), dtype=torch.float32).view_as(t))
    assert float(t[-1, -1]) == t.numel() - 1


@pytest.mark.skipif(not Path("/proc/self/smaps").exists() or not _thp_madvise(),
                    reason="no transparent huge pages on this system")
def test_large_weights_land_on_huge_pages():
    t = wm.empty_weights((wm.CHUNK // 2 + (4 << 20),))  # over half a chunk: a mapping of its own
    assert t.data_ptr() % wm.HUGE == 0
    t.fill_(1)
    huge = _region_huge_kb(t.data_ptr())
    if not huge:  # the kernel may find no free 2 MiB page; then the weights are merely on 4 KiB pages
        pytest.skip("the kernel gave no huge page (memory fragmented)")
    assert huge >= 2048


def test_interleaved_layer_uses_it_and_multiplies_as_before():
    from attnkit.quant.native import GGUFBlockLinear, has_x4, random_blocks

    if not has_x4("Q4_K"):
        pytest.skip("no interleaved Q4_K product in this build")
    blocks = random_blocks("Q4_K", 256, 1024, seed=0)
    row = GGUFBlockLinear(blocks, "Q4_K", 1024, interleaved=False)
    x4 = GGUFBlockLinear(blocks, "Q4_K", 1024, interleaved=True)
    assert x4.blocks.nbytes >= wm.MIN_BYTES and x4.blocks.data_ptr() % wm.ALIGN == 0
    x = torch.randn(3, 1024)
    torch.testing.assert_close(x4.kernel_product(x), row.kernel_product(x), rtol=0, atol=1e-4)


def test_switched_off_by_the_environment(monkeypatch):
    def refuse(nbytes):
        raise AssertionError("ATTNKIT_HUGE_PAGES=0 still mapped huge pages")

    monkeypatch.setattr(wm, "_mapping", refuse)
    monkeypatch.setattr(wm, "_chunk", None)
    monkeypatch.setenv("ATTNKIT_HUGE_PAGES", "0")
    for shape in ((wm.CHUNK,), (1 << 20,)):
        t = wm.empty_weights(shape)
        assert t.shape == shape and t.is_contiguous()


def test_a_refused_mapping_is_not_tried_again(monkeypatch):
    import mmap

    calls = []

    class NoMap:
        def __init__(self, *a, **k):
            calls.append(1)
            raise OSError("no anonymous mappings here")

    monkeypatch.setattr(mmap, "mmap", NoMap)
    monkeypatch.setattr(wm, "_refused", False)
    monkeypatch.setattr(wm, "_chunk", None)
    for shape in ((wm.CHUNK,), (1 << 20,), (1 << 20,)):
        t = wm.empty_weights(shape)
        assert t.shape == shape
    assert len(calls) == 1
