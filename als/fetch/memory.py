"""Giving freed chunk buffers back to the kernel (glibc's ``malloc_trim``)."""

from __future__ import annotations

import ctypes
import time

# Least time between two malloc_trim calls (seconds): it walks the heaps, a fraction of a millisecond.
TRIM_INTERVAL = 0.1
_last_trim = 0.0


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to release this way


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Give the pages of freed chunk buffers back to the kernel (glibc), at most every TRIM_INTERVAL.

    Chunks (up to 1 MiB decompressed) and compressed pieces are allocated and
    freed all the time. glibc keeps freed blocks in its heaps, and its mmap
    threshold rises to the largest block freed, so these buffers soon come
    from the heap instead of mmap: the resident size then ratchets up to the
    worst moment's fragmentation and stays there. ``malloc_trim(0)`` returns
    every free page wherever it lies. Measured reading a 161 MB image through
    the store: peak RSS 6 MB lower, no change in time.
    """
    global _last_trim
    now = time.monotonic()
    if _MALLOC_TRIM is None or now - _last_trim < TRIM_INTERVAL:
        return
    _last_trim = now
    _MALLOC_TRIM(0)
