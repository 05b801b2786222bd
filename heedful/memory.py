"""How the process allocates memory: large temporaries reused from the heap rather than mapped anew.

A fit makes many short-lived arrays of tens of MB (the [users, nodes] tables of every likelihood
evaluation, the posterior grid's chunks). glibc serves each one above its mmap threshold with a fresh
mapping and returns it on free, so every such array pays a page fault per 4 KiB page when first
written: 56 MB took 26-32 ms to allocate and fill on the 2-core development machine, against 3.4-5.5 ms
once freed memory stays in the heap (``benchmarks/fit_speed.py`` shows the effect end to end in
docs/performance.md). :func:`keep_freed_memory` raises the mmap and trim thresholds through
``mallopt``, so freed blocks are reused, and keeps every thread on one heap (``M_ARENA_MAX`` = 1), so
what the reading threads free is reused by the fit on the main thread instead of the fit touching new
pages (10M votes, 3 alternated runs: the CLI's peak RSS 1,726-1,760 -> 1,522-1,589 MiB for marginal,
2,082-2,130 -> 1,930-1,963 MiB for em). The price is a higher peak RSS than glibc's defaults (memory
freed late in a fit is not handed back). The console script calls it; library users opt in themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8    # glibc's mallopt parameters
MMAP_THRESHOLD = 1 << 30       # blocks below 1 GiB come from the heap (glibc's default: 128 KiB, rising to 32 MiB)
TRIM_THRESHOLD = (1 << 31) - 1  # free memory at the heap's top is handed back only past 2 GiB
TOP_PAD = 64 << 20             # grow the heap 64 MiB at a time
ARENA_MAX = 1                  # one heap for every thread: what the reading threads free, the fit reuses
OPT_OUT = "HEEDFUL_KEEP_MEMORY"   # =0 leaves the allocator's defaults


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse; False (and nothing changed) elsewhere or when
    ``HEEDFUL_KEEP_MEMORY=0``."""
    if os.environ.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):      # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(p, v) == 1 for p, v in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                               (M_TOP_PAD, TOP_PAD), (M_ARENA_MAX, ARENA_MAX)))


__all__ = ["keep_freed_memory"]
