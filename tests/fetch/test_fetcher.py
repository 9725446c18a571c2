"""The chunk fetcher against a real registry: one fetch per chunk, prefetch,
background fetch, read-ahead, and the cache limit."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest

from als.fetch.cache import ChunkCache
from als.errors import Interrupted, RegistryError
from als.fetch.fetcher import ChunkFetcher
from als.fetch.source import BlobSource
from als.fetch.pace import Pace
from als.formats import estargz
from als.layer.view import LayerView
from als.reference import parse_reference
from tests.support import images

CHUNK = 64 << 10


@pytest.fixture(scope="module")
def layer_source(registry, client):
    """A pushed layer of 20 files x 4 chunks of random bytes, and a way to make BlobSources for it."""
    files = {f"f{i:02d}": os.urandom(4 * CHUNK) for i in range(20)}
    layer = images.push_files(client, f"{registry.host}/fetch:1", files, chunk_size=CHUNK, level=1)
    ref = parse_reference(f"{registry.host}/fetch:1")
    layer.blob.seek(0)
    blob = layer.blob.read()
    toc_offset, footer = estargz.parse_footer(blob[-estargz.FOOTER_SIZE:], len(blob))
    toc = estargz.parse_toc(blob[toc_offset:len(blob) - footer], None, toc_offset=toc_offset)
    view = LayerView(toc.entries)

    def make(piece: int = 0) -> BlobSource:
        """A source that streams its ranges as the store's do; ``piece``: re-cut the body into pieces this big."""
        stream = partial(client.stream_range, ref, layer.digest)
        if piece:
            def stream(start, end, sink, inner=stream):
                return inner(start, end, lambda data: [sink(data[i:i + piece]) for i in range(0, len(data), piece)])
        return BlobSource("test layer", partial(client.read_range, ref, layer.digest), toc.compression,
                          view.chunks(), stream_range=stream)

    return make, view, files, layer


def served(registry, mark, digest):
    got = [a for a in registry.accesses_since(mark) if a.method == "GET" and a.uri.endswith(digest)]
    return len(got), sum(a.written for a in got)


def reads_stay_local(registry, fetcher, source, view, files, digest):
    """Every file reads back right, and nothing more is asked of the registry."""
    mark = registry.mark()
    for name, data in files.items():
        assert read_file(fetcher, source, view, name) == data
    assert served(registry, mark, digest) == (0, 0)


def read_file(fetcher, source, view, name):
    node = view.lookup([name])
    return b"".join(fetcher.read(source, node.chunks_for(0, node.size)))


def test_concurrent_reads_of_one_chunk_fetch_it_once(tmp_path, registry, layer_source):
    make, view, files, layer = layer_source
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path), readahead_max=0), make()
    chunk = view.lookup(["f03"]).chunks[1]
    mark = registry.mark()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda _: fetcher.read(source, [chunk])[0], range(64)))
    assert all(r == files["f03"][CHUNK:2 * CHUNK] for r in results)
    assert served(registry, mark, layer.digest)[0] == 1


def test_prefetch_claims_first_so_readers_wait_for_it(tmp_path, registry, layer_source):
    make, view, files, layer = layer_source
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path), readahead_max=0), make()
    front = [c for c in source.chunks if c.blob_end <= source.chunks[len(source.chunks) // 2].blob_start]
    mark = registry.mark()
    t = threading.Thread(target=fetcher.prefetch, args=(source, front, 64 << 20))
    t.start()
    got = read_file(fetcher, source, view, "f00")
    t.join(30)
    assert got == files["f00"]
    requests, _ = served(registry, mark, layer.digest)
    assert requests <= 2  # the prefetch's one request, plus at most a read that won the race
    mark = registry.mark()
    assert read_file(fetcher, source, view, "f05") == files["f05"]
    assert served(registry, mark, layer.digest) == (0, 0)


def test_background_fetches_every_chunk_once_then_reads_stay_local(tmp_path, registry, layer_source):
    make, view, files, layer = layer_source
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path)), make()
    mark = registry.mark()
    fetched = fetcher.background(source, threading.Event(), step=256 << 10)
    requests, written = served(registry, mark, layer.digest)
    assert written == fetched and written <= layer.size
    assert requests >= 4  # in steps, so foreground reads can get in between
    reads_stay_local(registry, fetcher, source, view, files, layer.digest)


def test_background_waits_while_a_foreground_read_is_in_flight(tmp_path, layer_source):
    make, view, files, layer = layer_source
    fetcher = ChunkFetcher(ChunkCache(tmp_path))
    stop = threading.Event()
    in_flight = fetcher.foreground.fetch()  # as read() holds it while it waits on the network
    in_flight.__enter__()
    t = threading.Thread(target=fetcher.background, args=(make(), stop))
    t.start()
    t.join(0.5)
    assert t.is_alive() and fetcher.bytes_fetched == 0
    in_flight.__exit__(None, None, None)
    t.join(30)
    assert not t.is_alive() and fetcher.bytes_fetched > 0


class Recording:
    """A source whose requests are logged as (thread name, start); the foreground's first waits for ``go``."""

    def __init__(self, source: BlobSource):
        self.source = source
        self.calls: list[tuple[str, int]] = []
        self.held = threading.Event()  # a foreground request is waiting for go
        self.go = threading.Event()
        inner = source._stream_range

        def stream(start, end, sink):
            name = threading.current_thread().name
            self.calls.append((name, start))
            if name == "foreground" and not self.go.is_set():
                self.held.set()
                self.go.wait(30)
                self.calls.append(("foreground done", start))
            return inner(start, end, sink)
        source._stream_range = stream

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]


def in_thread(name: str, target, *args, **kwargs) -> threading.Thread:
    t = threading.Thread(target=target, args=args, kwargs=kwargs, name=name, daemon=True)
    t.start()
    return t


def test_background_waits_for_a_container_read_and_for_its_fetch_to_end(tmp_path, layer_source):
    make, view, files, layer = layer_source
    fetcher = ChunkFetcher(ChunkCache(tmp_path), readahead_max=0)
    rec = Recording(make())
    since = fetcher.container_reads()  # the layer resolved: no container has read it yet
    bg = in_thread("background", fetcher.background, rec.source, threading.Event(), 256 << 10,
                   pace=Pace(quiet=0.0, delay=60.0), since=since)
    fg = in_thread("foreground", read_file, fetcher, rec.source, view, "f07")
    assert rec.held.wait(30)
    rec.go.set()
    fg.join(30)
    bg.join(30)
    assert not bg.is_alive()
    # the container's request was answered before the background fetch sent its first
    assert rec.names()[:2] == ["foreground", "foreground done"]
    assert any(n.startswith("als-background-fetch") for n in rec.names()[2:])


def test_background_fills_the_small_holes_foreground_reads_leave_in_one_request(tmp_path, registry, layer_source):
    make, view, files, layer = layer_source
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path), readahead_max=0), make()
    for name in sorted(files)[::2]:  # a hole of one 256 KiB file after each file read
        assert read_file(fetcher, source, view, name) == files[name]
    mark = registry.mark()
    fetcher.background(source, threading.Event(), step=16 << 20)
    assert served(registry, mark, layer.digest)[0] == 1  # one request across them, not one per hole
    assert fetcher.cached(source.chunks)
    reads_stay_local(registry, fetcher, source, view, files, layer.digest)


def test_background_keeps_two_requests_in_flight(tmp_path, layer_source):
    make, view, files, layer = layer_source
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path)), make()
    inner, lock, now, most = source._stream_range, threading.Lock(), [0], [0]
    second = threading.Event()

    def stream(start, end, sink):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
            if now[0] == 2:
                second.set()
        second.wait(2)  # the first request is still in flight when the next one starts
        try:
            return inner(start, end, sink)
        finally:
            with lock:
                now[0] -= 1
    source._stream_range = stream
    fetcher.background(source, threading.Event(), step=256 << 10)
    assert most[0] == 2 and fetcher.cached(source.chunks)


def test_a_read_waiting_for_the_background_fetch_does_not_pause_it(tmp_path, layer_source):
    """A container reading what the background fetch is bringing waits for it, and is no reason
    for the background fetch to wait (in turn) before its next request."""
    make, view, files, layer = layer_source
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path), readahead_max=0), make()
    inner, go, held = source._stream_range, threading.Event(), threading.Event()

    def stream(start, end, sink):
        held.set()
        go.wait(30)
        return inner(start, end, sink)
    source._stream_range = stream
    bg = in_thread("background", fetcher.background, source, threading.Event(), 256 << 10)
    assert held.wait(30)  # the first batch is claimed and in flight
    reads = fetcher.container_reads()
    fg = in_thread("foreground", read_file, fetcher, source, view, "f00")
    deadline = time.monotonic() + 10
    while fetcher.container_reads() == reads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fetcher.container_reads() == reads + 1 and fg.is_alive()  # waiting for the background's chunks
    assert fetcher.foreground.in_flight == 0
    go.set()
    fg.join(30)
    bg.join(30)
    assert not bg.is_alive() and not fg.is_alive() and fetcher.cached(source.chunks)


def test_background_of_a_layer_nobody_reads_starts_after_its_delay(tmp_path, layer_source):
    make, view, files, layer = layer_source
    fetcher = ChunkFetcher(ChunkCache(tmp_path))
    source = make()
    bg = in_thread("background", fetcher.background, source, threading.Event(), 256 << 10,
                   pace=Pace(quiet=0.0, delay=0.05), since=fetcher.container_reads())
    bg.join(30)
    assert not bg.is_alive() and fetcher.cached(source.chunks)


def test_a_container_streaming_the_layer_starts_the_background_without_waiting_for_quiet(tmp_path, layer_source):
    make, view, files, layer = layer_source
    fetcher = ChunkFetcher(ChunkCache(tmp_path), readahead_min=CHUNK, readahead_max=2 * CHUNK)
    source = make()
    bg = in_thread("background", fetcher.background, source, threading.Event(), 256 << 10,
                   pace=Pace(quiet=60.0, delay=60.0), since=fetcher.container_reads())
    names = sorted(files)
    for name in names[:4]:  # a tar reading the tree: misses in blob order, the read-ahead at its largest
        assert read_file(fetcher, source, view, name) == files[name]
    assert source.streaming
    bg.join(30)  # it never saw 60 s of quiet
    assert not bg.is_alive() and fetcher.cached(source.chunks)


def test_a_container_streaming_the_layer_does_not_hold_the_background_back(tmp_path, layer_source):
    make, view, files, layer = layer_source
    fetcher = ChunkFetcher(ChunkCache(tmp_path), readahead_min=CHUNK, readahead_max=2 * CHUNK)
    source = make()
    for name in sorted(files)[:4]:  # a tar reading the tree: its read-ahead at its largest
        assert read_file(fetcher, source, view, name) == files[name]
    assert source.streaming
    with fetcher.foreground.fetch(container=True):  # its next read waits on the network all along
        bg = in_thread("background", fetcher.background, source, threading.Event(), 256 << 10,
                       pace=Pace(quiet=60.0, delay=60.0), since=fetcher.container_reads() - 1)
        bg.join(30)  # it wants the whole layer: the background fetch helps it, not pauses for it
        assert not bg.is_alive() and fetcher.cached(source.chunks)


def test_background_yields_to_predictions_and_prefetches_too(tmp_path, layer_source):
    make, view, files, layer = layer_source
    fetcher = ChunkFetcher(ChunkCache(tmp_path), readahead_max=0)
    rec = Recording(make())
    node = view.lookup(["f11"])
    # the startup prediction's own read: a foreground fetch, but not a container starting
    fg = in_thread("foreground", fetcher.read, rec.source, node.chunks[:1], warming=True)
    assert rec.held.wait(30)
    assert fetcher.container_reads() == 0
    bg = in_thread("background", fetcher.background, rec.source, threading.Event(), 256 << 10,
                   pace=Pace(quiet=0.0, delay=60.0))
    rec.go.set()
    fg.join(30)
    bg.join(30)
    assert not bg.is_alive()
    assert rec.names()[:2] == ["foreground", "foreground done"]


def test_read_ahead_grows_on_sequential_misses_only(tmp_path, registry, layer_source):
    make, view, files, layer = layer_source
    names = sorted(files)
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path), readahead_min=CHUNK, readahead_max=1 << 20), make()
    mark = registry.mark()
    for name in names:  # a tree walk reads files in blob order
        assert read_file(fetcher, source, view, name) == files[name]
    sequential_requests, _ = served(registry, mark, layer.digest)
    assert sequential_requests < len(names) / 2

    fetcher, source = ChunkFetcher(ChunkCache(tmp_path / "other"), readahead_min=CHUNK,
                                   readahead_max=1 << 20), make()
    mark = registry.mark()
    scattered = names[::7]  # jumps: no read-ahead, so nothing extra is fetched
    for name in scattered:
        assert read_file(fetcher, source, view, name) == files[name]
    requests, written = served(registry, mark, layer.digest)
    assert requests == len(scattered)
    assert written == sum(c.blob_end - c.blob_start for n in scattered for c in view.lookup([n]).chunks)


def test_cache_limit_evicts_least_recently_used(tmp_path):
    cache = ChunkCache(tmp_path, memory_bytes=0, max_bytes=3000)
    from als.digest import sha256_digest
    blobs = [bytes([i]) * 1000 for i in range(4)]
    digests = [sha256_digest(b) for b in blobs]
    for d, b in zip(digests[:3], blobs[:3]):
        cache.put(d, b)
    assert cache.flush()
    assert cache.get(digests[0]) == blobs[0]  # now the most recently used
    cache.put(digests[3], blobs[3])  # over the limit: digests[1] goes
    assert cache.flush()
    assert not cache.contains(digests[1]) and cache.location(digests[1]) is None
    assert all(cache.contains(d) for d in (digests[0], digests[2], digests[3]))
    st = cache.stats()
    assert (st.entries, st.bytes, st.evicted) == (3, 3000, 1)
    again = ChunkCache(tmp_path, memory_bytes=0, max_bytes=3000)  # the index is rebuilt from disk
    assert again.stats().bytes == 3000
    assert again.prune(1000) == 2000 and again.stats().entries == 1
    pack, offset, length = again.location(next(d for d in digests if again.contains(d)))
    with open(pack, "r+b") as f:
        f.seek(offset)
        f.write(b"x" * length)
    assert again.verify() == (1, 1) and again.stats().entries == 0


@pytest.mark.parametrize("piece", [1, 1000, 100_000])
def test_streamed_runs_with_gaps_deliver_every_chunk(tmp_path, layer_source, piece):
    """Chunks are decoded as a range streams in, whatever the pieces, across the gaps of a coalesced run."""
    make, view, files, layer = layer_source
    names = sorted(files)[::2]  # every other file: one request, with a gap per file skipped
    wanted = [c for n in names for c in view.lookup([n]).chunks]
    fetcher = ChunkFetcher(ChunkCache(tmp_path), coalesce_gap=1 << 30)
    assert fetcher._fetch(make(piece), fetcher._claim(wanted)[0]) is None
    assert fetcher.requests == 1 and fetcher.inflight() == 0
    for name in names:
        assert read_file(fetcher, make(), view, name) == files[name]
    assert fetcher.requests == 1


def test_a_stream_cut_short_fails_the_chunks_it_did_not_bring(tmp_path, layer_source):
    make, view, files, layer = layer_source
    source = make()
    full = source._stream_range

    def short(start, end, sink):
        return full(start, end - 1, sink)

    source._stream_range = short
    fetcher = ChunkFetcher(ChunkCache(tmp_path), coalesce_gap=1 << 30)
    chunks = view.lookup(["f01"]).chunks
    assert isinstance(fetcher._fetch(source, fetcher._claim(chunks)[0]), RegistryError)
    assert fetcher.inflight() == 0
    assert all(fetcher.cache.contains(c.digest) for c in chunks[:-1])


class FailingPuts(ChunkCache):
    """A cache whose every store fails (a full or broken disk)."""

    def put(self, digest, data):
        raise OSError(28, "No space left on device")


def test_a_chunk_the_cache_cannot_store_is_served_and_leaves_no_claim_behind(tmp_path, layer_source):
    make, view, files, _ = layer_source
    fetcher = ChunkFetcher(FailingPuts(tmp_path), readahead_max=0, wait_timeout=5.0)
    source = make()
    for _ in range(2):  # an orphaned claim would make the second read wait out the timeout and fail
        assert read_file(fetcher, source, view, "f03") == files["f03"]
    assert fetcher.inflight() == 0


def test_a_failure_between_claim_and_fetch_answers_every_claim(tmp_path, layer_source):
    make, view, files, _ = layer_source
    fetcher = ChunkFetcher(ChunkCache(tmp_path), wait_timeout=5.0)
    broken = make()
    broken.after = lambda *a: 1 / 0  # choosing the read-ahead fails: the read goes on without it
    assert read_file(fetcher, broken, view, "f04") == files["f04"]
    broken.stream_range = lambda *a: [][1]  # not a registry error: an unexpected one
    with pytest.raises(IndexError):
        read_file(fetcher, broken, view, "f05")
    assert fetcher.inflight() == 0
    assert read_file(fetcher, make(), view, "f05") == files["f05"]  # at once, not after the timeout


def test_a_reader_that_goes_away_stops_waiting_for_anothers_fetch(tmp_path, layer_source):
    make, view, files, _ = layer_source
    fetcher = ChunkFetcher(ChunkCache(tmp_path), readahead_max=0, wait_timeout=30.0)
    source, gate = make(), threading.Event()
    slow = make()
    inner = slow.stream_range
    slow.stream_range = lambda start, end, sink: (gate.wait(20), inner(start, end, sink))[1]
    node = view.lookup(["f06"])
    chunks = node.chunks_for(0, CHUNK)
    first = threading.Thread(target=lambda: fetcher.read(slow, chunks), daemon=True)
    first.start()
    deadline = time.monotonic() + 10
    while not fetcher.inflight() and time.monotonic() < deadline:
        time.sleep(0.01)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Interrupted):
        fetcher.read(source, chunks, cancel=cancel)
    gate.set()
    first.join(20)
    assert b"".join(fetcher.read(source, chunks)) == files["f06"][:CHUNK]


def test_a_background_batch_holds_no_chunk_its_readers_have_had(tmp_path, layer_source):
    """A chunk is freed once delivered, not kept until the last request of its batch ends: with
    two batches in flight, that was 11 MB of the store's peak memory reading an image whole."""
    import tracemalloc

    make, view, files, layer = layer_source
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path, memory_bytes=0, pending_bytes=CHUNK)), make()
    inner, seen = source._stream_range, []
    total = sum(c.blob_end - c.blob_start for c in source.chunks)

    def stream(start, end, sink):
        got = [0]

        def counting(piece):
            sink(piece)
            got[0] += len(piece)
            if not seen and got[0] > 0.9 * total:  # most of the layer decoded and handed out
                seen.append(tracemalloc.get_traced_memory()[0] - base)
        return inner(start, end, counting)
    source._stream_range = stream
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fetched = fetcher.background(source, threading.Event(), step=64 << 20)  # one batch, one request
    finally:
        tracemalloc.stop()
    assert fetched >= total and seen
    assert seen[0] < 1 << 20, f"{seen[0]} bytes held of {len(files) * 4 * CHUNK} decoded"
