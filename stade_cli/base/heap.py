"""The process heap: freed memory handed back to the OS at block boundaries, without paying for it in every op.

Memory is bounded by what lives at once only if what is freed leaves the resident set; glibc's defaults
keep much of it (see _libc and release_memory). Nothing here changes any result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import cache

from stade_cli.base.errors import StadeError

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MIB = 32  # glibc's own ceiling for the threshold (HEAP_MAX_SIZE / 2 on 64-bit)
HEAP_VARIABLE = "STADE_HEAP"  # "glibc": leave glibc's defaults; a number: the threshold in MiB (bench/heap.py)


def _threshold_mib() -> int | None:
    """The mmap threshold to fix, in MiB, or None for glibc's own defaults (STADE_HEAP, for benchmarks)."""
    value = os.environ.get(HEAP_VARIABLE, str(MMAP_THRESHOLD_MIB)).strip().lower()
    if value == "glibc":
        return None
    if not value.isdigit() or not 1 <= int(value) <= MMAP_THRESHOLD_MIB:
        raise StadeError(
            f"{HEAP_VARIABLE}={value!r} is not 'glibc' or a whole number of MiB from 1 to {MMAP_THRESHOLD_MIB}.",
            f"unset it (the default is {MMAP_THRESHOLD_MIB})",
        )
    return int(value)


@cache
def _libc() -> ctypes.CDLL | None:
    """glibc, with its heap's thresholds fixed (once, on first use).

    glibc's mmap threshold starts at 128 KiB and rises to the size of each large chunk freed (up to 32 MiB), and
    the heap's top is trimmed only past twice that. Left alone, tensors of a block's size stay in the heap,
    fragmented, and the resident set grows as blocks go by (measured: +300 MB over 12 blocks of a 2.6 GB model).
    Fixing the threshold at 32 MiB keeps what is larger (a block's weights, Hessians and activations at scale)
    in mappings of their own, returned when freed; what is smaller is reused from the heap without fresh page
    faults (a 1 MiB threshold cost 1.2-1.8x in wall time: bench/results/heap.json), and malloc_trim hands the
    heap's free pages back once per block (release_memory).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # pragma: no cover - not glibc
        return None
    if not hasattr(libc, "malloc_trim"):
        return None
    mib = _threshold_mib()
    if mib is None:
        return None
    libc.mallopt(M_MMAP_THRESHOLD, mib << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * mib << 20)  # as glibc's dynamic rule pairs them: no trim on every free
    return libc


def release_memory() -> None:
    """Hand memory freed by the last block back to the OS.

    glibc keeps freed activations in its heaps, fragmented, so without this the resident set grows
    by part of a block's activations with every block (measured: +10-35 MB per SmolLM2 block, varying run to run).
    Called once before the first block too, which fixes glibc's thresholds (see _libc).
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def bound_heap() -> None:
    """Fix glibc's thresholds now, before the first large tensor (a command's or a stage's start)."""
    _libc()
