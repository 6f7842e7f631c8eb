"""The process heap: large tensors in mappings of their own, and freed memory handed back to the OS.

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

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_MIB = 1  # the default: allocations from 1 MiB up get a mapping of their own
MAX_THRESHOLD_MIB = 32  # glibc's own ceiling for it (HEAP_MAX_SIZE / 2 on 64-bit)
HEAP_VARIABLE = "STADE_HEAP"  # "glibc": leave glibc's defaults; a number: the threshold in MiB (bench/heap.py)


def _threshold_mib() -> int | None:
    """The mmap threshold to fix, in MiB, or None for glibc's own defaults (STADE_HEAP, for benchmarks)."""
    value = os.environ.get(HEAP_VARIABLE, str(MMAP_THRESHOLD_MIB)).strip().lower()
    if value == "glibc":
        return None
    if not value.isdigit() or not 1 <= int(value) <= MAX_THRESHOLD_MIB:
        raise StadeError(
            f"{HEAP_VARIABLE}={value!r} is not 'glibc' or a whole number of MiB from 1 to {MAX_THRESHOLD_MIB}.",
            f"unset it (the default is {MMAP_THRESHOLD_MIB})",
        )
    return int(value)


@cache
def _libc() -> ctypes.CDLL | None:
    """glibc, with its mmap threshold fixed (once, on first use).

    glibc's mmap threshold starts at 128 KiB but rises to the size of each large chunk freed (up to 32 MiB), after
    which a block's weights, Hessians and activations come from the heap, where they fragment and stay resident as
    the blocks go by (measured: +300 MB over 12 blocks of a 2.6 GB model). A fixed threshold of 1 MiB returns each
    such tensor to the OS when it is freed, at the price of fresh page faults for every one (up to 1.8x in wall
    time on SmolLM2). A 32 MiB threshold wins that back there but lost the bound on the synthetic model of
    bench/scale.py (calibrate 0.38x and streaming prune 0.31x its bytes, against 0.25x): bench/heap.py measures
    the choices side by side (STADE_HEAP).
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
