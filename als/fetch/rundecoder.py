"""The sink of one streamed range request of the chunk fetcher: each chunk decoded as soon as its bytes are in.

Kept apart from the fetcher (als/fetch/fetcher.py), which decides what to
fetch and answers the claims; this decides, byte by byte, when a chunk of a
request can be handed out: at its last compressed byte for eStargz and
zstd:chunked, and for a gzip index's span as soon as the span, inflated as it
streams in, reaches the chunk's end (each chunk then checked against its own
digest by the fetcher). It also chooses where a gzip index span's request may
stop (``cut``) and ends the read-ahead claims it stopped short of as Skipped.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from typing import Protocol

from als.errors import FormatError, RegistryError
from als.fetch.source import BlobSource
from als.formats import gzindex
from als.formats import toc as T

# With [fetch] span_cut, a gzip index span is fetched from its checkpoint only as far as the files a read
# needs likely end: their share of the span's compressed bytes, times this, plus SPAN_SLACK. Short, the
# rest follows in a second request.
SPAN_MARGIN = 1.25
SPAN_SLACK = 64 << 10


class Skipped(RegistryError):
    """A chunk fetched only along with others (read-ahead, a span's other files) that the request
    stopped short of: nothing is wrong with it, and whoever waits for it fetches it (``ChunkFetcher.read``)."""


class Deliverer(Protocol):
    """What a run decoder hands chunks to (the chunk fetcher)."""

    def deliver_one(self, source: BlobSource, c: T.Chunk, fut: Future, raw: bytes | memoryview,
                    inflated: bool = False) -> BaseException | None:
        ...

    def finish(self, c: T.Chunk, fut: Future, *, result: bytes | None = None,
               exc: BaseException | None = None) -> None:
        ...


class RunDecoder:
    """The sink of one streamed range request: decodes each chunk of the run once its bytes are in.

    Only the bytes from the first undelivered chunk on are kept, so memory is
    about one compressed chunk (for a gzip index, one compressed span and the
    inflated bytes of its pieces still to come) plus one network read,
    whatever the run's size.
    Chunks are delivered in blob order; each claim is dropped once delivered.
    The chunks of a gzip index's span share its whole range; they are
    inflated as the span streams in (one inflate for all of them) and each is
    handed out once its own bytes are inflated and match its own digest, not
    when the span's last byte arrives.
    """

    def __init__(self, fetcher: Deliverer, source: BlobSource, run: list, required: set | None = None,
                 begun: threading.Event | None = None):
        self.fetcher = fetcher
        self.begun = begun  # set once bytes come in: another request may wait for this one's answer to begin
        self.source = source
        self.left = deque(run)  # (chunk, future) in blob order, not delivered yet
        self.start = run[0][0].blob_start
        self.end = max(c.blob_end for c, _ in run)
        self.received = 0
        self.failed: BaseException | None = None
        self._buf = bytearray()
        self._buf_start = self.start  # blob offset of _buf[0]
        self._spans = source.compression == T.GZIP_SPANS
        self._inflater: gzindex.SpanInflater | None = None
        self._inflating: T.Span | None = None  # the span _inflater inflates
        self._fed = 0  # blob offset up to which _inflater has had the bytes
        # Chunks this run must answer for (None: all); the others are delivered if the bytes come anyway.
        self._required = required
        self.cut = self.end  # the first request asks for [start, cut)
        if self._spans and required is not None and not source.streaming:
            needed = [c for c, _ in run if c in required]
            # A span fetched in part once is wanted again: its next miss fetches it whole, so that
            # reading a span's files one after another costs its prefix twice at most.
            if needed and not any(c.blob_start in source.spans_cut for c in needed):
                self.cut = min(self.end, max(_span_reach(c) for c in needed))
                source.spans_cut.update(c.blob_start for c, _ in run if c.blob_end > self.cut)

    def feed(self, piece: bytes) -> None:
        if self.begun is not None:
            self.begun.set()
        self.received += len(piece)
        self._buf += piece
        buf_end = self._buf_start + len(self._buf)
        if self._spans:
            self._inflate(buf_end)
        while not self._spans and self.left and self.left[0][0].blob_end <= buf_end:
            c, fut = self.left.popleft()
            raw = bytes(memoryview(self._buf)[c.blob_start - self._buf_start:c.blob_end - self._buf_start])
            # every chunk is delivered: one that fails its digest fails its own readers, not its neighbours'
            failed = self.fetcher.deliver_one(self.source, c, fut, raw)
            self.failed = self.failed or failed
        # keep only what the next chunk needs (runs are sorted by blob start); a gap is dropped
        # as it arrives, never ahead of it
        keep = min(self.left[0][0].blob_start, buf_end) if self.left else buf_end
        if keep > self._buf_start:
            del self._buf[:keep - self._buf_start]
            self._buf_start = keep

    def _inflate(self, buf_end: int) -> None:
        """Hand out the span chunks at the head of the run whose bytes the bytes in so far inflate to."""
        while self.left:
            c, fut = self.left[0]
            try:
                if self._inflating is not c.span:
                    self._inflater, self._inflating, self._fed = gzindex.SpanInflater(c.span), c.span, c.blob_start
                if buf_end > self._fed:
                    with memoryview(self._buf) as view:
                        self._inflater.feed(view[self._fed - self._buf_start:buf_end - self._buf_start])
                    self._fed = buf_end
                data = self._inflater.piece(c.inner_offset, c.size)
            except FormatError as e:  # the span's chunks fail; the run goes on with the next span
                self._fail_span(c.span, FormatError(f"{self.source.label}: span at blob offset {c.blob_start}: {e}"))
                continue
            if data is None:
                return
            self.left.popleft()
            failed = self.fetcher.deliver_one(self.source, c, fut, data, inflated=True)  # each one, whatever failed
            self.failed = self.failed or failed
            if self.left and self.left[0][0].span is c.span:
                self._inflater.drop_before(self.left[0][0].inner_offset)

    def _fail_span(self, span: T.Span | None, exc: BaseException) -> None:
        while self.left and self.left[0][0].span is span:
            c, fut = self.left.popleft()
            self.fetcher.finish(c, fut, exc=exc)
        self.failed = self.failed or exc
        self._inflater = self._inflating = None

    def wants_more(self) -> bool:
        """Whether a claim this run must answer is left after [start, cut)."""
        return self.cut < self.end and any(self._required is None or c in self._required for c, _ in self.left)

    def finish(self) -> None:
        """The request ended: raise if a chunk of it is still undelivered (then ``abort`` fails it).

        Optional chunks past a cut short request end as Skipped: their waiters fetch them."""
        if not self.left:
            return
        if self.received == self.cut - self.start < self.end - self.start and not self.wants_more():
            self.abort(Skipped(f"{self.source.label}: chunk not fetched along with the others"))
            return
        if self._spans and self.received == self.end - self.start and self._inflater is not None:
            raise FormatError(f"{self.source.label}: span at blob offset {self.left[0][0].blob_start}: "
                              f"{self._inflater.shortfall()}")
        raise RegistryError(f"{self.source.label}: got {self.received} of the {self.end - self.start} bytes "
                            f"at blob offset {self.start}")

    def abort(self, exc: BaseException) -> None:
        """The request failed: every chunk not delivered yet fails with it."""
        while self.left:
            c, fut = self.left.popleft()
            self.fetcher.finish(c, fut, exc=exc)
        self._buf = bytearray()
        self._inflater = self._inflating = None

def _span_reach(c: T.Chunk) -> int:
    """Where a gzip index span's compressed bytes likely suffice to inflate chunk ``c`` (see SPAN_MARGIN)."""
    span = c.span
    reach = c.inner_offset + c.size
    if span is None or reach >= span.size:
        return c.blob_end
    share = (c.blob_end - c.blob_start) * reach / span.size
    return min(c.blob_end, c.blob_start + int(share * SPAN_MARGIN) + SPAN_SLACK)
