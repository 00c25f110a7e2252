"""Keep freed memory in the process: glibc's malloc tuned for a step loop of same-sized large tensors.

Each eager step allocates and frees the same multi-megabyte activations (a 512-token prefill's
(512, 3072) gate/up output is 6 MB). glibc serves blocks above its mmap threshold with fresh
mappings and returns the top of the heap to the OS past its trim threshold, so every step pays the
page faults of touching that memory again: on the 64-request offline workload about a fifth of the
time (docs/performance.md). PyTorch's CPU allocator has no cache of its own; its CPU performance
guide recommends jemalloc or tcmalloc for the same reason. Raising both thresholds keeps the memory
mapped and reused instead: blocks up to 32 MiB (glibc's ceiling for the mmap threshold) come from
the heap, and the heap is trimmed only past 1 GiB free. Peak RSS grows little, since a step's
working set is reused rather than duplicated.

Applied once per process by the engine on the CPU; ``ATTNKIT_NO_MALLOC_TUNING=1`` leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30


@functools.cache
def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when it was done (glibc only)."""
    if os.environ.get("ATTNKIT_NO_MALLOC_TUNING") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
