"""Memory for the weight blocks the C kernels stream every decode step: anonymous mappings on 2 MiB pages.

A decode step reads every weight once, front to back, at the machine's read bandwidth. On 4 KiB pages the
hardware prefetchers stop at every page boundary and the TLB misses every 4 KiB; on transparent huge pages
(``madvise(MADV_HUGEPAGE)``, honoured where ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or
``madvise``) the same one-row kernels read 2–30% faster with the weights cold (benchmarks/gguf_kernels.py,
docs/performance.md, session 15).
Linux does not give a file's page-cache mapping huge pages, so this is for the blocks attnkit copies anyway (rows
interleaved in fours or sixteens, fused layers, experts).

Tensors of at least :data:`MIN_BYTES` are carved, 64-byte aligned, from 2 MiB-aligned chunks of :data:`CHUNK`
bytes (a larger tensor gets a mapping of its own); a chunk lives while any tensor carved from it does. Only what
is written becomes resident, so a chunk's unused tail costs address space, not memory. Elsewhere (no mmap, or
huge pages refused) and with ``ATTNKIT_HUGE_PAGES=0`` in the environment (benchmarks/huge_pages.py's A/B) the
tensors come from ``torch.empty``.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import warnings

import torch

HUGE = 2 << 20
CHUNK = 32 << 20
MIN_BYTES = 64 << 10  # smaller tensors (tiny models, norms) stay on the ordinary heap
ALIGN = 64

_lock = threading.Lock()
_chunk: torch.Tensor | None = None  # the chunk being carved (uint8, 2 MiB-aligned start)
_used = 0
_refused = False  # a mapping or its advice failed once: every later tensor comes from the heap


def _mapping(nbytes: int) -> torch.Tensor | None:
    """A fresh anonymous mapping of ``nbytes`` (rounded up to 2 MiB) starting on a 2 MiB boundary, advised onto
    huge pages; None where that cannot be had (remembered: not tried again)."""
    global _refused
    if _refused:
        return None
    size = -(-nbytes // HUGE) * HUGE
    try:
        mm = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (AttributeError, OSError, ValueError):
        _refused = True
        return None
    with warnings.catch_warnings():  # a writable mmap buffer is shared, not copied: that is the point
        warnings.simplefilter("ignore")
        raw = torch.frombuffer(mm, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE
    try:
        mm.madvise(mmap.MADV_HUGEPAGE, start, size)
    except (AttributeError, OSError, ValueError):
        _refused = True
        return None
    return raw[start:start + size]


def empty_weights(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialised contiguous tensor for weight blocks, on huge pages where the system offers them."""
    global _chunk, _used
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES or os.environ.get("ATTNKIT_HUGE_PAGES", "1") == "0":
        return torch.empty(shape, dtype=dtype)
    with _lock:
        if nbytes > CHUNK // 2:  # its own mapping: the current chunk keeps its room for the smaller ones
            buf = _mapping(nbytes)
            return torch.empty(shape, dtype=dtype) if buf is None else buf[:nbytes].view(dtype).view(shape)
        at = -(-_used // ALIGN) * ALIGN
        if _chunk is None or at + nbytes > _chunk.numel():
            _chunk, _used, at = _mapping(CHUNK), 0, 0
            if _chunk is None:
                return torch.empty(shape, dtype=dtype)
        _used = at + nbytes
        return _chunk[at:at + nbytes].view(dtype).view(shape)


def empty_weights_like(t: torch.Tensor) -> torch.Tensor:
    return empty_weights(tuple(t.shape), t.dtype)
