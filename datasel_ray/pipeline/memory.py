"""Freed heap pages handed back to the operating system at step boundaries.

A long-lived process (the driver, a Ray worker that runs many partition tasks) frees each step's transients
(numpy arrays, Arrow buffers), but glibc's malloc and Arrow's memory pool keep freed pages mapped for reuse, so
the process's RSS carries the retained tails of every step it ran. :func:`release_free_memory`, called when a
step or a partition task ends, returns them, so a process's peak is that of its largest step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["release_free_memory"]


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Return the free pages of Arrow's default memory pool and of the C heap to the OS (live data is kept)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
