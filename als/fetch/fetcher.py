"""The chunk reader: cache first, then one verified fetch per chunk, ever.

A FUSE read becomes a list of chunks. Cached ones are served from the chunk
cache; missing neighbours are fetched together in one range request, each one
decompressed and checked against its digest before anything sees it.
Concurrent readers of the same chunk share one fetch (an in-flight table of
futures), so a burst of reads after a container starts costs one round trip
per region, not one per reader.

Three producers feed the same table, so a read never fetches what another is
already fetching: the foreground (FUSE reads, with an adaptive read-ahead in
blob order that grows while misses stay sequential, like the kernel's, and the
startup prediction's reads), the prefetch of a layer's prioritised region at
resolve time, and the background fetch of the rest of the blob
(als/fetch/background.py), which yields to the other two.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Sequence

from als.fetch import along
from als.fetch.cache import ChunkCache
from als.digest import sha256_digest
from als.errors import FormatError, RegistryError, VerificationError
from als.formats import lazy
from als.formats import toc as T
from als.fetch.front import FrontRead
from als.fetch.pace import Foreground
from als.fetch.rundecoder import RunDecoder, Skipped
from als.fetch.source import BlobSource
from als.wait import wait_for

log = logging.getLogger("als.fetch")

# Times a reader fetches a chunk itself after the fetch it waited on stopped short of it.
SKIPPED_RETRIES = 3


class ChunkFetcher:
    def __init__(self, cache: ChunkCache, *, coalesce_gap: int = 64 << 10, max_request: int = 16 << 20,
                 wait_timeout: float = 120.0, readahead_min: int = 256 << 10, readahead_max: int = 8 << 20,
                 file_readahead: int = 0, dir_readahead: int = 0, span_cut: bool = False,
                 program_end: int = along.PROGRAM_END):
        self.cache = cache
        self.coalesce_gap = coalesce_gap
        self.max_request = max_request
        self.wait_timeout = wait_timeout
        self.readahead_min = readahead_min
        self.readahead_max = readahead_max
        self.file_readahead = file_readahead
        self.dir_readahead = dir_readahead
        self.program_end = program_end
        self.span_cut = span_cut  # gzip index spans: fetch only as far as a read needs ([fetch] span_cut)
        self._inflight: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.foreground = Foreground()  # what the background fetch yields to (als/fetch/pace.py)
        self.bytes_fetched = 0
        self.requests = 0

    def cached(self, chunks: Sequence[T.Chunk]) -> bool:
        """Whether reading ``chunks`` needs no network (a FUSE read that does waits elsewhere)."""
        contains = self.cache.contains
        return all(c.zeros or contains(c.digest) for c in chunks)

    def inflight(self) -> int:
        """Chunks being fetched right now (for `als status` and the metrics)."""
        with self._lock:
            return len(self._inflight)

    def container_reads(self) -> int:
        """Container reads so far (a background fetch started now waits for the next one)."""
        return self.foreground.reads

    # ---- the three producers ---------------------------------------------------------
    def read(self, source: BlobSource, chunks: list[T.Chunk], file_chunks: Sequence[T.Chunk] = (),
             neighbours: Callable[[], Sequence[T.Chunk]] | None = None, cancel: threading.Event | None = None,
             warming: bool = False, on_miss: Callable[[], None] | None = None) -> list[bytes]:
        """The verified bytes of each chunk, in order. Raises ALSError subclasses.

        ``cancel``: the reader went away (a FUSE interrupt): stop waiting for
        other fetches and raise Interrupted. A fetch this call started itself
        runs to its end (bounded by the request deadline): others may be
        waiting for the same chunks.

        ``file_chunks`` are all the chunks of the file being read, given for
        programs and libraries: they are mapped and paged in out of order, so
        on a miss the rest of the file, up to ``file_readahead`` compressed
        bytes, comes in the same request instead of one per page fault, but
        for its last ``program_end`` bytes, asked for apart and first
        (``along.split_end``).
        ``neighbours`` gives the chunks of the small files beside a small file
        being read: interpreters load many of one directory, one after
        another, so on a miss those that follow in the blob, up to
        ``dir_readahead`` compressed bytes, come in the same request. Asked
        only on a miss: listing them costs up to 70 us for a directory.
        ``warming``: the read is the store's own (the startup prediction
        reading an ELF header), not a container's: it does not tell the
        background fetch that a container started, and reads nothing ahead.
        ``on_miss`` is called once the chunks missing are being fetched, before the wait: what it
        starts (the startup prediction, reading the program's header) finds them in flight,
        rather than fetching them first, alone, and leaving this read without its read-ahead.
        """
        out: dict[T.Chunk, bytes] = {}
        missing = []
        for c in dict.fromkeys(chunks):
            if c.zeros:
                out[c] = bytes(c.size)
                continue
            data = self.cache.get(c.digest)
            if data is not None:
                out[c] = data
            else:
                missing.append(c)
        if not missing:
            if not warming:
                self.foreground.read_cached()
            return _sized(source, chunks, out)
        mine, theirs = self.claim(missing)
        if mine:
            # What this call fetches is handed to fetch_claims, which answers every claim whatever
            # fails; the read-ahead claims are not kept here: once delivered, their chunks belong
            # to the cache and to whoever waits on them.
            # A warming read must not move the read-ahead window either: the window follows the
            # containers' order, whose front-to-back reading starts the background's stream.
            ahead = [] if warming else self._read_ahead(source, mine, file_chunks, neighbours)
            # Not for a reader going front to back (a tar, a copy), nor once the background
            # fetch streams the blob: what is wanted first is then what comes first.
            end = [] if source.streaming or source.filling else along.split_end(ahead, file_chunks, self.program_end)
            begun = threading.Event() if end else None  # the end's answer has begun: the rest may follow
            if end:  # asked first: small, and wanted as soon as the first
                self._fetch_aside(source, end, [], container=True, begun=begun)
            self._fetch_aside(source, list(mine), ahead, container=not warming, after=begun)
        elif not warming:
            self.foreground.read_cached()
        if on_miss is not None:
            try:
                on_miss()
            except Exception as e:  # what it starts is an optimisation: the read goes on without it
                log.warning("%s: what a miss starts failed: %s", source.label, e)
        deadline = time.monotonic() + self.wait_timeout
        for c, fut in mine + theirs:
            out[c] = self._wait(source, c, fut, deadline, cancel)
        return _sized(source, chunks, out)

    def read_span(self, source: BlobSource, chunks: list[T.Chunk], start: int, end: int,
                  file_chunks: Sequence[T.Chunk] = (), neighbours: Callable[[], Sequence[T.Chunk]] | None = None,
                  cancel: threading.Event | None = None, warming: bool = False,
                  on_miss: Callable[[], None] | None = None) -> bytes:
        """Bytes ``[start, end)`` of a file (offsets in the file), which ``chunks`` (its chunks that
        hold them, in order) cover; the rest as ``read``. Within one cached chunk, only the blocks
        the span lies in are read from the disk cache (ChunkCache.get), not the whole chunk."""
        if len(chunks) == 1:
            c = chunks[0]
            data = self._cached_span(c, start - c.offset, end - c.offset)
            if data is not None:
                if not warming:
                    self.foreground.read_cached()
                return data
        pieces = self.read(source, chunks, file_chunks, neighbours, cancel=cancel, warming=warming, on_miss=on_miss)
        first = chunks[0].offset
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return data[start - first:end - first]

    def _cached_span(self, c: T.Chunk, start: int, end: int) -> bytes | None:
        if c.zeros:
            return bytes(max(min(end, c.size) - start, 0))
        return self.cache.get(c.digest, start, end, size=c.size)  # another length: ``read`` refuses it

    def _wait(self, source: BlobSource, c: T.Chunk, fut: Future, deadline: float,
              cancel: threading.Event | None) -> bytes:
        """Chunk ``c``'s bytes from ``fut``; fetched here if the fetch it was part of stopped short of it."""
        for attempt in range(SKIPPED_RETRIES + 1):
            try:
                return wait_for(fut, deadline, cancel)
            except FutureTimeout:
                raise RegistryError(f"timed out waiting for chunk {c.digest} of {source.label}") from None
            except Skipped:
                if attempt == SKIPPED_RETRIES:
                    raise
                mine, theirs = self.claim([c])
                fut = (mine or theirs)[0][1]
                if mine:
                    self.fetch_claims(source, mine)
        raise AssertionError("unreachable")

    def _read_ahead(self, source: BlobSource, mine: list, file_chunks: Sequence[T.Chunk],
                    neighbours: Callable[[], Sequence[T.Chunk]] | None) -> list:
        """Claims for what to fetch along with a foreground miss (see ``read``); never raises."""
        try:
            by_offset = sorted((c for c, _ in mine), key=lambda c: c.blob_start)
            ahead = source.after(by_offset[0], by_offset[-1], self.readahead_min, self.readahead_max, self._fetched)
            if len(file_chunks) > 1:
                ahead += along.following(file_chunks, by_offset[0], self.file_readahead)
            if neighbours is not None:
                ahead += along.following(neighbours(), by_offset[0], self.dir_readahead)
            return self.claim([c for c in dict.fromkeys(ahead) if not self.cache.contains(c.digest)])[0]
        except Exception as e:  # a read-ahead is an optimisation: the read goes on without it
            log.warning("%s: choosing what to read ahead failed: %s", source.label, e)
            return []

    def _fetched(self, c: T.Chunk) -> bool:
        """Whether chunk ``c`` is cached or being fetched (for the read-ahead's sense of order). The
        in-flight table is read without its lock: a stale answer only misjudges one read-ahead."""
        return c.digest in self._inflight or self.cache.contains(c.digest)

    def _fetch_aside(self, source: BlobSource, claimed: list, optional: list, container: bool,
                     begun: threading.Event | None = None, after: threading.Event | None = None) -> None:
        """Fetch a read's claims, and what it reads ahead, on a thread of their own: the read waits
        only for its own chunks, each handed out as its bytes are in, not for the end of requests
        that bring more (the rest of a program, the small files after the one asked for).
        ``container``: a container's read, which the background fetch yields to (``Foreground``).
        ``begun`` is set once the answer's first bytes are in (or the fetch ended); the request
        waits for ``after`` to be, at most ``along.END_LEAD`` seconds."""
        def fetch() -> None:
            with self.foreground.fetch(container=container):
                if after is not None:
                    after.wait(along.END_LEAD)
                try:
                    self.fetch_claims(source, claimed, optional=optional, begun=begun)
                finally:
                    if begun is not None:
                        begun.set()

        try:
            threading.Thread(target=fetch, name=f"{threading.current_thread().name}-fetch", daemon=True).start()
        except RuntimeError:  # no thread to be had: fetched here, and every claim answered
            fetch()

    def prefetch(self, source: BlobSource, chunks: Sequence[T.Chunk], max_request: int,
                 front: FrontRead | None = None) -> int:
        """Fetch ``chunks`` (the prioritised front of a layer) in as few requests as allowed.

        Claims them first, so foreground reads that arrive meanwhile wait for
        these fetches instead of starting their own. The chunks that lie in
        ``front``, a read of the blob's first bytes started before the layer
        was built, are taken from it as its bytes arrive. Returns bytes fetched.
        """
        received: list[int] = []  # this prefetch's own: others fetch at the same time
        wanted = [c for c in chunks if not c.zeros and not self.cache.contains(c.digest)]
        if wanted:
            with self.foreground.fetch():
                mine = self.claim(wanted)[0]
                self._answering(source, mine, lambda: self.fetch_claims(
                    source, self._from_front(source, mine, front, received), max_request=max_request,
                    received=received))
        return sum(received)

    def _from_front(self, source: BlobSource, claimed: list, front: FrontRead | None, received: list[int]) -> list:
        """Deliver the claimed chunks that ``front`` brings and that check out; the claims left to
        fetch. Empties ``claimed``; ``received`` hears the front's bytes. A chunk that fails its
        check there is fetched again, not failed: that read was only a head start."""
        if front is None:
            return claimed
        left: list = []
        claimed.sort(key=lambda cf: cf[0].blob_start, reverse=True)
        while claimed:
            c, fut = claimed.pop()
            raw = front.take(c.blob_start, c.blob_end)
            if raw is None:
                left.append((c, fut))
                continue
            try:
                chunk = self._decode(source, c, raw)
            except Exception as e:
                log.warning("%s: %s; fetching it again", source.label, e)
                left.append((c, fut))
                continue
            self._hand_out(source, c, fut, chunk)
        self._count(front.received(), received)
        return left

    # ---- mechanics ----------------------------------------------------------------------
    def claim(self, chunks: Sequence[T.Chunk]) -> tuple[list, list]:
        """Split chunks into those this caller must fetch and those already being fetched."""
        mine, theirs = [], []
        with self._lock:
            for c in chunks:
                fut = self._inflight.get(c.digest)
                if fut is None:
                    fut = Future()
                    self._inflight[c.digest] = fut
                    mine.append((c, fut))
                else:
                    theirs.append((c, fut))
        return mine, theirs

    def fetch_claims(self, source: BlobSource, claimed: list, max_request: int | None = None,
                     optional: list | None = None, gap: int | None = None,
                     received: list[int] | None = None, begun: threading.Event | None = None) -> BaseException | None:
        """Fetch and deliver the claimed chunks (``claim``); the first failure, or None.

        ``optional`` claims (read-ahead) are fetched where they come cheaply; claims at most
        ``gap`` bytes apart (default: ``coalesce_gap``) share a request; ``received`` hears the
        bytes of each request; ``begun`` is set when the first bytes of an answer arrive; with
        ``span_cut``, a gzip index span is fetched only as far as ``claimed`` needs, and the
        optional chunks past that end as Skipped (their waiters fetch them).

        Each run is one range request, streamed: a chunk is decoded and handed
        out as soon as its bytes are in, so neither the compressed run nor its
        decompressed chunks are ever held whole (a 16 MiB run would be 16 MiB
        compressed and 35 MiB decompressed). Takes ownership of ``claimed``
        and empties it, for the same reason: a delivered chunk must not
        outlive its waiters because of a list here.
        """
        optional = optional or []
        # The chunks, not their futures: a set of futures would keep every chunk of the batch
        # decoded in memory until its last request ends (11 MB of a 4 MiB background batch).
        required = {c for c, _ in claimed} if self.span_cut else None
        claimed += optional
        optional.clear()
        return self._answering(source, claimed, lambda: self._fetch_runs(
            source, claimed, max_request or self.max_request, required, self.coalesce_gap if gap is None else gap,
            received, begun))

    def _fetch_runs(self, source: BlobSource, claimed: list, max_request: int, required: set | None, gap: int,
                    received: list[int] | None, begun: threading.Event | None) -> BaseException | None:
        runs = list(self._runs_of(self._drop_cached(claimed), max_request, gap))
        claimed.clear()
        failed = None
        while runs:
            run = RunDecoder(self, source, self._with_riders(source, runs.pop(0)), required, begun)
            try:
                source.stream_range(run.start, run.cut, run.feed)
                if run.wants_more():  # the span's files end further on than estimated
                    with self._lock:
                        self.requests += 1
                    source.stream_range(run.cut, run.end, run.feed)
                run.finish()
            except Exception as e:  # every waiter must hear about it
                failed = failed or e
                run.abort(e)
            self._count(run.received, received)
            failed = failed or run.failed
        return failed

    def _count(self, n: int, received: list[int] | None) -> None:
        """One request of ``n`` bytes, in the fetcher's totals and in its caller's ``received``."""
        with self._lock:
            self.bytes_fetched += n
            self.requests += 1
        if received is not None:
            received.append(n)

    def _answering(self, source: BlobSource, claimed: list,
                   work: Callable[[], BaseException | None]) -> BaseException | None:
        """Run ``work`` (it answers the claims it can and returns its first failure); whatever
        happens in it, every claim in ``claimed`` is answered on the way out.

        A claim nobody answers would make every later read of its chunk wait
        for the full timeout and fail, until the store restarts. The futures
        are held weakly: a delivered chunk must not outlive its readers here.
        """
        guard = [(c, weakref.ref(fut)) for c, fut in claimed]
        failed = None
        try:
            failed = work()
        except Exception as e:
            failed = e
            log.error("%s: fetching %d chunks failed: %s", source.label, len(guard), e)
        finally:
            for c, ref in guard:
                fut = ref()
                if fut is not None and not fut.done():
                    self.finish(c, fut, exc=failed or RegistryError(
                        f"{source.label}: the fetch of chunk {c.digest} ended without it"))
        return failed

    def _with_riders(self, source: BlobSource, run: list) -> list:
        """``run`` with the uncached chunks that lie inside its byte range anyway, claimed and in blob order.

        They cost no extra byte. For a gzip index they are most of the point:
        every file of a span arrives with the span, and a span fetched for one
        small file is not fetched again for its neighbours.
        """
        start, end = run[0][0].blob_start, max(c.blob_end for c, _ in run)
        riders = [c for c in source.within(start, end) if not self.cache.contains(c.digest)]
        if not riders:
            return run
        mine, _ = self.claim(riders)  # those already in flight (ours among them) stay where they are
        if not mine:
            return run
        return sorted(run + mine, key=lambda cf: (cf[0].blob_start, cf[0].inner_offset))

    def _runs_of(self, claimed: list, max_request: int, gap: int):
        """``claimed`` in blob order, cut into runs of one range request each."""
        if not claimed:
            return
        claimed.sort(key=lambda cf: (cf[0].blob_start, cf[0].inner_offset))
        yield from self._runs(claimed, max_request, gap)

    def absorb(self, source: BlobSource, data: bytes, start: int) -> int:
        """Cache the chunks that lie wholly inside blob bytes already fetched for another reason
        (the tail read that found the TOC); returns how many were new."""
        end = start + len(data)
        inside = [c for c in source.chunks if c.blob_start >= start and c.blob_end <= end
                  and not self.cache.contains(c.digest)]
        mine, _ = self.claim(inside)
        if mine:
            self._answering(source, mine, lambda: self._deliver(source, mine, data, start))
        return len(mine)

    def _deliver(self, source: BlobSource, claimed: list, data: bytes, start: int) -> None:
        """Decode, verify, cache and hand out each claimed chunk of ``data`` (blob bytes from ``start``)."""
        with memoryview(data) as view:
            for c, fut in claimed:
                self.deliver_one(source, c, fut, view[c.blob_start - start:c.blob_end - start])

    def deliver_one(self, source: BlobSource, c: T.Chunk, fut: Future,
                     raw: bytes | memoryview, inflated: bool = False) -> BaseException | None:
        """Decode, verify, cache and hand out one chunk; its failure, or None."""
        try:
            chunk = self._decode(source, c, raw, inflated)
        except Exception as e:
            self.finish(c, fut, exc=e)
            return e
        self._hand_out(source, c, fut, chunk)
        return None

    def _hand_out(self, source: BlobSource, c: T.Chunk, fut: Future, chunk: bytes) -> None:
        """Cache a verified chunk and answer its claim with it."""
        try:
            self.cache.put(c.digest, chunk)
        except Exception as e:  # verified all the same: served from memory, fetched again next time
            log.warning("%s: caching chunk %s failed: %s", source.label, c.digest, e)
        self.finish(c, fut, result=chunk)

    def _drop_cached(self, claimed: list) -> list:
        """Finish claims that another fetch completed between our cache check and our claim.

        A fetch caches its chunk before it leaves the in-flight table, so once
        we hold the claim, the cache tells whether the chunk arrived meanwhile.
        """
        left = []
        for c, fut in claimed:
            data = self.cache.get(c.digest) if self.cache.contains(c.digest) else None
            if data is None:
                left.append((c, fut))
            else:
                self.finish(c, fut, result=data)
        return left

    @staticmethod
    def _runs(claimed, max_request: int, gap: int):
        run = [claimed[0]]
        for c, fut in claimed[1:]:
            first, last = run[0][0], run[-1][0]
            if c.blob_start - last.blob_end <= gap and c.blob_end - first.blob_start <= max_request:
                run.append((c, fut))
            else:
                yield run
                run = [(c, fut)]
        yield run

    def _decode(self, source: BlobSource, c: T.Chunk, raw: bytes | memoryview, inflated: bool = False) -> bytes:
        """The chunk's verified bytes from its compressed ones (``inflated``: they are decompressed already)."""
        if inflated:
            data = raw
        else:
            fmt = lazy.for_compression(source.compression)
            if fmt is None:
                raise FormatError(f"{source.label}: no decompressor for {source.compression}")
            data = fmt.decompress_chunk(raw, c)
        if sha256_digest(data) != c.digest:
            raise VerificationError(
                f"{source.label}: chunk at blob offset {c.blob_start} does not match its digest {c.digest}")
        return data

    def finish(self, c: T.Chunk, fut: Future, *, result: bytes | None = None,
                exc: BaseException | None = None) -> None:
        with self._lock:
            self._inflight.pop(c.digest, None)
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


def _sized(source: BlobSource, chunks: list[T.Chunk], out: dict[T.Chunk, bytes]) -> list[bytes]:
    """The chunks' bytes, in order, each exactly as long as the TOC says.

    The cache and shared fetches are keyed by digest alone, so a TOC that
    gives a known digest another size would get that digest's true bytes at
    the wrong length (a file read short of its size): refuse instead.
    """
    for c in chunks:
        if len(out[c]) != c.size:
            raise VerificationError(f"{source.label}: chunk at file offset {c.offset} is {c.size} bytes in "
                                    f"the TOC, but its digest {c.digest} names {len(out[c])} bytes")
    return [out[c] for c in chunks]
