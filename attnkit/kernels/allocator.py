"""glibc's malloc tuned for the loop at hand: keep freed memory (the engine) or give it back (training under a budget).

Each eager step allocates and frees the same multi-megabyte activations (a 512-token prefill's
(512, 3072) gate/up output is 6 MB). glibc serves blocks above its mmap threshold with fresh
mappings and returns the top of the heap to the OS past its trim threshold, so every step pays the
page faults of touching that memory again: on the 64-request offline workload about a fifth of the
time (docs/performance.md). PyTorch's CPU allocator has no cache of its own; its CPU performance
guide recommends jemalloc or tcmalloc for the same reason. Tuned, every block comes from the heap and stays
mapped for reuse: the mmap threshold raised to glibc's ceiling (32 MiB) and mmap then turned off for blocks above
it (M_MMAP_MAX 0) — a 1B's 512-token prompt makes a (512, 16384) float32 gate/up output, 32 MiB and a header,
mapped afresh in each of 16 layers whenever the heap held no free chunk that large: 46,000–62,000 page faults in a
process's first such prompt, ~137,000 and 0.27 s of a 1.3 s prompt after its heap had been trimmed (Zen 5) — and
the heap is trimmed only past 1 GiB free. A thread's arena that cannot hold a block hands it to the main heap (glibc's
arena retry). Peak RSS grows little, since a step's working set is reused rather than duplicated.

Applied once per process by the engine on the CPU; ``ATTNKIT_NO_MALLOC_TUNING=1`` leaves malloc as it is.

Training under a memory budget (QLoRA: a quantized base, :func:`return_freed_memory`) wants the opposite. Left
alone, glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), so a backward pass's
1–16 MB temporaries soon come from the heap, freed in another order than they were taken: the heap fragments
and holds what was freed. Six QLoRA steps on a Llama-3.2-1B-shaped Q4_K_M (256 tokens each, gradient
checkpointing) peaked at 2,047–2,111 MB that way; with the threshold fixed at 512 KiB, blocks above it are mapped
and unmapped on their own, and the same run peaked at 1,471 MB, about 5% slower (docs/finetune.md, session 20).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt parameters, from glibc's <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30
MMAP_MAX_DEFAULT = 65536  # glibc's default M_MMAP_MAX
RETURN_MMAP_THRESHOLD = 512 << 10  # training under a budget: blocks of 512 KiB and more mapped apart, unmapped when freed


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc with mallopt's argument types declared, or None (another libc)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def _mallopt(mmap_threshold: int, trim_threshold: int, mmap_max: int) -> bool:
    libc = None if os.environ.get("ATTNKIT_NO_MALLOC_TUNING") else _libc()
    if libc is None:
        return False
    return (bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
            and bool(libc.mallopt(M_MMAP_MAX, mmap_max)))


@functools.cache
def tune_malloc() -> bool:
    """Keep every block on glibc's heap for reuse (mmap threshold at its ceiling, no mmap above it, trim past 1 GiB)
    for this process; True when it was done (glibc only)."""
    return _mallopt(MMAP_THRESHOLD, TRIM_THRESHOLD, 0)


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold low (no dynamic rise) and trim the heap past the same: freed blocks go back to
    the system instead of fragmenting the heap (mmap on again if :func:`tune_malloc` turned it off); True when it
    was done (glibc only, not under ``ATTNKIT_NO_MALLOC_TUNING``). For a process that trains under a memory budget,
    not one that serves."""
    return _mallopt(RETURN_MMAP_THRESHOLD, RETURN_MMAP_THRESHOLD, MMAP_MAX_DEFAULT)
