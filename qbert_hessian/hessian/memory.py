"""Keep freed host memory in the process while Hessian-vector products run (glibc only).

A product by double backward (:mod:`.hvp`) allocates a few hundred MiB of intermediate tensors, many of them
as large as an attention-score tensor (16 x 12 x 128 x 128 floats: 12 MiB), and frees them all before the next
product. PyTorch's CPU tensors come from ``malloc``. With glibc's defaults such blocks are either mapped with
``mmap`` and unmapped on ``free``, or served from the heap whose free top is handed back to the kernel once it
exceeds the trim threshold. Either way the next product gets fresh pages, and every 4 KiB page is a fault that
the kernel zero-fills: about 26,000 per product of MiniLM's first layer on a BBC batch (benchmarks/PRODUCTS.md).

:func:`reuse_freed_memory` raises the mmap threshold to glibc's maximum (32 MiB on 64-bit) and the trim
threshold out of reach for its duration, so a product's blocks come from the heap and stay there for the next
product: about 5,400 faults per product there, and the product 1.14x faster. The process's resident size stays
at the peak it reached; the peak itself moved by less than the measurement's spread (benchmarks/RESULTS_BBC.md).
On leaving, the thresholds are set where glibc's own dynamic rule settles after freeing a block of the mmap
threshold's size (mmap threshold 32 MiB, trim threshold twice that), and ``malloc_trim`` hands the retained
memory back.

This changes where memory comes from, never a number. Where the C library is not glibc (macOS, musl) it does
nothing and says so in its return value. PyTorch's CPU performance guides get the same effect by preloading
jemalloc or tcmalloc (``LD_PRELOAD``); this needs no library to install.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import sys
from collections.abc import Iterator

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc on 64-bit: HEAP_MAX_SIZE / 2; larger values are refused
TRIM_THRESHOLD_NEVER = -1  # mallopt takes an int; glibc keeps the trim threshold unsigned, where -1 is never


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not all(hasattr(libc, f) for f in ("mallopt", "malloc_trim", "gnu_get_libc_version")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """For the ``with`` block, keep freed heap memory for reuse instead of returning it to the kernel.

    Args:
        enabled: False makes it a no-op (the system allocator's behaviour, for comparison).

    Yields:
        Whether the allocator was retuned (False when disabled or the C library is not glibc).
    """
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    if not (
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_NEVER)
    ):
        logger.debug("mallopt refused the thresholds; freed memory is handled as usual")
        yield False
        return
    try:
        yield True
    finally:
        libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)
