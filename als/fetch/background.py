"""The background fetch: the rest of a layer's blob streamed into the cache, in blob order.

A fully fetched layer never reads from the registry again, and a container
reading it whole (a tar, a scan) waits on this stream, so it should fill the
link; yet on a shared link each request it has in flight is one a
container's next miss waits behind. So it yields (als/fetch/pace.py): it
starts once a container's start-up burst has gone quiet (or at once when a
container streams the layer front to back), pauses while a foreground fetch
is in flight, and keeps two requests in flight only while a container
streams the layer and so waits on it; each wait is bounded, so it cannot be starved for good. The
foreground's fetches leave holes; it fetches across the small ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

from als.fetch.cache import ChunkCache
from als.fetch.fetcher import ChunkFetcher
from als.fetch.memory import release_free_memory
from als.fetch.pace import Pace
from als.fetch.source import BlobSource
from als.formats import toc as T

log = logging.getLogger("als.fetch")

# Cached chunks up to this many bytes apart are fetched across rather than with a request for each
# side: on a 20 ms, 200 Mbit/s link a round trip costs the time of 500 KB.
GAP = 512 << 10
# A batch (the unit the fetch pauses between) gathers ``step`` missing bytes within SPAN * step of the blob.
SPAN = 4
# Batches in flight at once while a container streams the layer (and waits on this fetch): one
# after another, 4 MiB came at 17.5 MB/s over a 25 MB/s link. Otherwise one: a container's next
# miss waits behind every request in flight, and on a fast link two decode on two cores at once,
# which starved a container starting beside them on 2 cores (test_optimize's workload, under load).
REQUESTS = 2
# Longest a batch waits for the cache's disk writer to catch up (seconds).
WRITER_WAIT = 10.0


def fill(fetcher: ChunkFetcher, source: BlobSource, stop: threading.Event, step: int = 4 << 20,
         progress: Callable[[int], None] | None = None, pace: Pace = Pace(), since: int | None = None) -> int:
    """Fetch every chunk of ``source`` not cached yet, yielding to the foreground (``pace``).

    ``since``: the count of container reads (``fetcher.container_reads()``)
    when the layer resolved; given, the first request waits for a container
    read after it, then for the foreground to go quiet (both bounded by
    ``pace.delay``). Returns the bytes fetched. Errors end the pass (the next
    read or the next resolve retries); a failed background fetch never fails
    a read. ``progress`` hears the bytes of each request (it feeds the metrics).
    """
    foreground = fetcher.foreground
    fetched = 0
    started = since is None
    pending: deque[Future] = deque()  # the batches in flight, oldest first: (bytes, failure)
    failed: BaseException | None = None

    def collect(done: Future) -> BaseException | None:
        nonlocal fetched
        n, e = done.result()
        fetched += n
        if progress is not None and n:
            progress(n)
        return e
    with ThreadPoolExecutor(max_workers=REQUESTS, thread_name_prefix="als-background-fetch") as pool:
        for batch in _batches(fetcher.cache, source, step):
            if stop.is_set() or failed is not None:
                break
            if not started:
                foreground.wait_start(stop, pace, since, lambda: source.streaming)
                started = True
            source.filling = True
            if not source.streaming:  # a container reading it front to back wants all of it
                foreground.wait_idle(stop, pace)
            _wait_writer(fetcher.cache, stop)
            while len(pending) >= (REQUESTS if source.streaming else 1) and failed is None:
                failed = collect(pending.popleft())
            if failed is None and not stop.is_set():
                pending.append(pool.submit(_fetch_batch, fetcher, source, batch))
        for done in pending:
            e = collect(done)
            failed = failed or e
    # Whole, the layer needs no guesses; cut short (a registry failure, the store stopping), its
    # next containers' programs are worth predicting again, as before the pass began.
    source.filling = False
    if failed is not None:
        log.info("%s: background fetch stopped: %s", source.label, failed)
    return fetched


def _batches(cache: ChunkCache, source: BlobSource, step: int) -> Iterator[list[T.Chunk]]:
    """The chunks not cached yet in blob order, ``step`` compressed bytes at a time however far
    apart the foreground's fetches left them; chunks sharing bytes (a gzip index's span) never
    split between two batches, which may be in flight at once."""
    chunks = source.chunks
    i = 0
    while i < len(chunks):
        batch: list[T.Chunk] = []
        missing = end = 0
        while i < len(chunks) and (chunks[i].blob_start < end or missing < step and (
                not batch or chunks[i].blob_end - batch[0].blob_start <= SPAN * step)):
            if not cache.contains(chunks[i].digest):
                batch.append(chunks[i])
                missing += chunks[i].blob_end - chunks[i].blob_start
            end = max(end, chunks[i].blob_end)
            i += 1
        if batch:
            yield batch


def _fetch_batch(fetcher: ChunkFetcher, source: BlobSource, batch: list[T.Chunk]) -> tuple[int, BaseException | None]:
    """One batch: the bytes it received and its failure, or None. Claimed here, on the thread that
    answers the claims, so that no claim is left unanswered if the batch never runs; and handed
    over, not kept: its chunks are released one by one as they are delivered."""
    received: list[int] = []
    failed = fetcher.fetch_claims(source, fetcher.claim(batch)[0], gap=GAP, received=received)
    release_free_memory()
    return sum(received), failed


def _wait_writer(cache: ChunkCache, stop: threading.Event) -> None:
    """Back-pressure on the background fetch only: wait while the cache's disk writer is behind.

    Each batch adds its decompressed chunks to the writer's queue; fetching
    the next before the queue has room would only make ``put`` write inline
    or pile chunks up in memory. Foreground reads never wait here, and the
    wait is bounded so a stuck disk cannot stall the pass for good (``put``
    then writes inline, which bounds memory).
    """
    deadline = time.monotonic() + WRITER_WAIT
    while not stop.is_set() and not cache.wait_for_room(0.1):
        if time.monotonic() >= deadline:
            return
