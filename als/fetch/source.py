"""A layer's compressed blob as the chunk fetcher sees it: where its bytes come from, its chunks in blob order.

It also carries the layer's read-ahead state, because a read-ahead is a
choice about one blob's chunks: the window grows fourfold while foreground
misses follow each other in blob order and collapses on a jump.
"""

from __future__ import annotations

import bisect
import threading
from typing import Callable, Sequence

from als.formats import toc as T

StreamRange = Callable[[int, int, Callable[[bytes], None]], int]  # start, end, sink -> bytes handed over
MAX_FILLED = 256  # chunks between a read-ahead's end and the next miss looked at for being fetched already


class BlobSource:
    """A layer's compressed blob: where its bytes come from and its chunks in blob order.

    It also carries the layer's read-ahead state: the window grows while
    foreground misses follow each other in blob order (a container reading a
    directory tree reads the blob front to back) and collapses on a jump.
    """

    def __init__(self, label: str, read_range: Callable[[int, int], bytes], compression: str = T.GZIP,
                 chunks: Sequence[T.Chunk] = (), stream_range: StreamRange | None = None):
        self.label = label  # "image <ref> layer <digest>", for log lines
        self.read_range = read_range  # [start, end) of the compressed blob
        self._stream_range = stream_range
        self.compression = compression
        self.chunks = sorted({c for c in chunks if not c.zeros}, key=lambda c: (c.blob_start, c.inner_offset))
        self._starts = [c.blob_start for c in self.chunks]
        self._lock = threading.Lock()
        self._expect = -1  # blob index a sequential miss would start at
        self._window = 0  # read-ahead bytes (compressed)
        # The read-ahead reached its largest window: a container reads this layer front to back
        # (a tar, a copy, a scan), which the background fetch helps rather than hinders.
        self.streaming = False
        # The background fetch is bringing in the rest of the blob, in blob order: the start-up burst
        # is over, and guessing what a container reads next only cuts that stream into pieces.
        self.filling = False
        # gzip index spans (by blob start) a request fetched only in part: the next one takes them whole
        self.spans_cut: set[int] = set()

    def stream_range(self, start: int, end: int, sink: Callable[[bytes], None]) -> int:
        """Hand blob bytes [start, end) to ``sink`` in order as they arrive; returns their count.

        Sources made from a plain ``read_range`` hand the range over in one piece.
        """
        if self._stream_range is not None:
            return self._stream_range(start, end, sink)
        data = self.read_range(start, end)
        sink(data)
        return len(data)

    def within(self, start: int, end: int) -> list[T.Chunk]:
        """The chunks whose compressed bytes lie wholly inside blob bytes [start, end)."""
        i = bisect.bisect_left(self._starts, start)
        j = bisect.bisect_left(self._starts, end, lo=i)
        return [c for c in self.chunks[i:j] if c.blob_end <= end]

    def index_of(self, chunk: T.Chunk) -> int:
        i = bisect.bisect_left(self._starts, chunk.blob_start)
        while i < len(self.chunks) and self.chunks[i] != chunk and self._starts[i] == chunk.blob_start:
            i += 1
        return i if i < len(self.chunks) and self.chunks[i] == chunk else -1

    def after(self, first: T.Chunk, last: T.Chunk, min_window: int, max_window: int,
              fetched: Callable[[T.Chunk], bool] | None = None) -> list[T.Chunk]:
        """The chunks to read ahead after a foreground miss of ``first``..``last`` (blob order).

        A miss past where the last read-ahead ended is still sequential when
        everything between was ``fetched`` by others (cached or in flight): a
        container reading the layer front to back that catches up with the
        background fetch misses where that fetch's batch ended, and is no less
        a front-to-back reader for it.
        """
        start, end = self.index_of(first), self.index_of(last)
        if start < 0 or end < 0:
            return []
        with self._lock:
            expect = self._expect
            sequential = (expect >= 0 and expect - 1 <= start <= expect + 2) or (
                fetched is not None and 0 <= expect < start <= expect + MAX_FILLED
                and all(fetched(c) for c in self.chunks[expect:start]))
            # Quadrupled, not doubled: a tree walk (a tar, a scan) reaches the largest window, and so starts
            # the background fetch it waits on, in three misses of a round trip each rather than five.
            self._window = min(max(self._window * 4, min_window), max_window) if sequential else 0
            self.streaming = max_window > 0 and self._window >= max_window
            limit = last.blob_end + self._window
            stop = end + 1
            while stop < len(self.chunks) and self.chunks[stop].blob_end <= limit:
                stop += 1
            self._expect = stop
        return self.chunks[end + 1:stop]
