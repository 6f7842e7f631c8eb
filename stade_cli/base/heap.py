"""The process heap: large tensors in mappings of their own, and freed memory handed back to the OS.

Memory is bounded by what lives at once only if what is freed leaves the resident set; glibc's defaults
keep much of it (see _libc and release_memory). Nothing here changes any result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20  # bytes: allocations from here up get a mapping of their own


@cache
def _libc() -> ctypes.CDLL | None:
    """glibc, with large allocations given their own mappings (set once, on first use).

    glibc's threshold for that starts at 128 KiB but rises to the size of each large chunk freed (up to
    32 MiB), after which a block's weights, Hessians and activations come from the heap, where they
    fragment and stay resident as the blocks go by (measured: +300 MB over 12 blocks of a 2.6 GB model).
    A fixed threshold returns each such tensor to the OS when it is freed.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # pragma: no cover - not glibc
        return None
    if not hasattr(libc, "malloc_trim"):
        return None
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return libc


def release_memory() -> None:
    """Hand memory freed by the last block back to the OS.

    glibc keeps freed activations in its heaps, fragmented, so without this the resident set grows
    by part of a block's activations with every block (measured: +10-35 MB per SmolLM2 block, varying run to run).
    Called once before the first block too, which fixes glibc's mmap threshold (see _libc).
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def bound_heap() -> None:
    """Fix glibc's mmap threshold now, before the first large tensor (a command's or a stage's start)."""
    _libc()
