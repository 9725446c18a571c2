"""A layer blob's first bytes, streamed in before the layer's chunks are known.

An optimized layer's TOC says where its prioritised front ends (the
landmark) long before the layer is built from it: decoding the TOC's JSON is
a tenth of the parse, and the entries and the tree are the rest. The store
starts reading the front at that word, and the prefetch, once the chunks
are known, takes each chunk's bytes as soon as they are in: the transfer
overlaps the build, and the decoding the transfer. Nothing here is trusted:
every chunk taken is checked against its digest like any fetched one.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

StreamRange = Callable[[int, int, Callable[[bytes], None]], int]  # (start, end, sink) -> bytes handed over


class FrontRead:
    """Blob bytes [0, end) as they arrive, for one reader that takes them in blob order (``take``)."""

    def __init__(self, end: int, timeout: float = 60.0) -> None:
        self.end = end
        self._timeout = timeout  # the most ``take`` waits for bytes that do not come
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._over = False  # the read ended, whole or not

    def run(self, stream_range: StreamRange) -> None:
        """Read the range (on a thread of the caller's); a failure only ends it early."""
        try:
            stream_range(0, self.end, self._feed)
        except Exception:  # the prefetch fetches what this did not bring, and reports its own errors
            pass
        finally:
            with self._cond:
                self._over = True
                self._cond.notify_all()

    def _feed(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            self._cond.notify_all()

    def take(self, start: int, end: int) -> bytes | None:
        """Bytes [start, end), waiting until they are in; None if the read ended (or stalled past
        its timeout) without them."""
        if end > self.end:
            return None
        deadline = time.monotonic() + self._timeout
        with self._cond:
            while len(self._buf) < end and not self._over:
                left = deadline - time.monotonic()
                if left <= 0:  # stalled: what it has not brought yet is fetched the usual way
                    self._over = True
                    return None
                self._cond.wait(left)
            return bytes(memoryview(self._buf)[start:end]) if len(self._buf) >= end else None  # one copy

    def received(self) -> int:
        """Bytes in so far."""
        with self._cond:
            return len(self._buf)
