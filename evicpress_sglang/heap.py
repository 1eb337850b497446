"""Keep freed memory in the process's heap instead of handing it back to the OS.

At 100k contexts every [configurations x contexts] temporary of the placement solver is
~10 MB, and a re-plan allocates several. glibc serves blocks that large with fresh
mappings and unmaps them when freed (its mmap threshold starts at 128 KiB), and trims the
heap's free top above 128 KiB, so every re-plan page-faults its temporaries in again: a
fifth to a third of a 100k re-plan on the development VM
(``bench/results/2026-11-23-placement-heap/``). Raising both thresholds keeps that memory.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc refuses larger values on 64-bit
INT_MAX = 2**31 - 1


def keep_freed_heap(keep_bytes: int) -> bool:
    """Let the heap keep up to ``keep_bytes`` of freed memory (process-wide, for good).

    Returns whether the C library took it: False for ``keep_bytes`` 0 and where the C
    library has no ``mallopt`` (not glibc). Blocks up to 32 MiB then come from the heap
    rather than their own mappings, and the heap is trimmed only above ``keep_bytes``.
    """
    if keep_bytes <= 0:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, min(keep_bytes, MMAP_THRESHOLD_MAX))
                and mallopt(M_TRIM_THRESHOLD, min(keep_bytes, INT_MAX)))
