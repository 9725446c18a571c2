"""The chunk fetcher against a real registry: one fetch per chunk, prefetch, read-ahead, streamed
runs, failures, and the cache limit."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from als.fetch.cache import ChunkCache
from als.errors import Interrupted, RegistryError, VerificationError
from als.fetch.fetcher import ChunkFetcher
from als.fetch.front import FrontRead
from tests.fetch.support import CHUNK, read_file, served, settled


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


def _front(source, end, alter=None) -> FrontRead:
    """A front read of the first ``end`` bytes, run at once; ``alter`` changes what it hands on."""
    read = FrontRead(end)
    stream = source.stream_range if alter is None else (
        lambda start, stop, sink: source.stream_range(start, stop, lambda data: sink(alter(data))))
    threading.Thread(target=read.run, args=(stream,), daemon=True).start()
    return read


def test_a_prefetch_takes_what_an_early_front_read_brings_and_fetches_only_the_rest(tmp_path, registry,
                                                                                     layer_source):
    make, view, files, layer = layer_source
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path), readahead_max=0), make(piece=1000)
    front = source.chunks[:12]
    mark = registry.mark()
    read = _front(source, source.chunks[8].blob_end)  # a front shorter than the prefetch: the rest is fetched
    fetched = fetcher.prefetch(source, front, 64 << 20, read)
    assert served(registry, mark, layer.digest) == (2, fetched)
    assert fetcher.cached(front) and not fetcher.cached(source.chunks[12:13])
    mark = registry.mark()
    for name in ("f00", "f01", "f02"):
        assert read_file(fetcher, source, view, name) == files[name]
    assert served(registry, mark, layer.digest) == (0, 0)


@pytest.mark.parametrize("how", ["tampered", "failed"])
def test_a_front_read_that_brings_wrong_bytes_or_none_costs_a_fetch_never_a_failed_read(tmp_path, registry,
                                                                                        layer_source, how):
    make, view, files, layer = layer_source
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path), readahead_max=0), make()
    front = source.chunks[:8]

    def alter(data):
        if how == "failed":
            raise OSError("connection reset")
        return data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]  # the first chunk no longer checks out

    mark = registry.mark()
    fetcher.prefetch(source, front, 64 << 20, _front(source, front[-1].blob_end, alter))
    assert served(registry, mark, layer.digest)[0] == 2  # the front, then what it did not bring right
    assert fetcher.cached(front)
    for name in ("f00", "f01"):
        assert read_file(fetcher, source, view, name) == files[name]


def test_a_read_is_answered_once_its_own_chunks_are_in_not_when_its_request_ends(tmp_path, registry,
                                                                                layer_source):
    make, view, files, layer = layer_source
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path), readahead_max=0, file_readahead=8 << 20), make()
    node = view.lookup(["f04"])
    first = node.chunks[0]
    release = threading.Event()
    inner = source._stream_range

    def stream(start, end, sink):  # the rest of the file waits until the read has had its answer
        got = [0]

        def held(data):
            sink(data)
            got[0] += len(data)
            if start + got[0] >= first.blob_end:
                release.wait(10)
        return inner(start, end, held)

    source._stream_range = stream
    mark = registry.mark()
    answered = []
    reader = threading.Thread(target=lambda: answered.append(fetcher.read(source, [first], node.chunks)))
    reader.start()
    reader.join(5)
    early = not reader.is_alive()  # answered while the request still held the rest of the file
    release.set()
    reader.join(10)
    assert early and answered == [[files["f04"][:CHUNK]]]
    settled(fetcher)
    assert fetcher.cached(node.chunks)  # the rest of the file came in the same request
    assert served(registry, mark, layer.digest)[0] == 1


def test_a_programs_end_is_asked_for_apart_from_the_code_before_it(tmp_path, layer_source):
    """A program's first miss brings it whole, its end (an ELF file's data segment, which starting
    the program reads right after the first page) in a request of its own rather than behind
    everything between, and first: the rest is asked for once the end's answer has begun, so that
    on a link carrying one answer after the other the end comes first whatever the registry does."""
    make, view, files, layer = layer_source
    fetcher = ChunkFetcher(ChunkCache(tmp_path), readahead_max=0, file_readahead=8 << 20, program_end=CHUNK)
    source = make()
    node = view.lookup(["f05"])
    c = node.chunks
    ranges, events = [], []
    inner = source._stream_range

    def stream(start, end, sink):
        ranges.append((start, end))
        events.append(("asked", start))
        if start == c[3].blob_start:
            time.sleep(0.1)  # the end's answer is slow to begin

        def first(data, sink=sink):
            if ("answered", start) not in events:
                events.append(("answered", start))
            sink(data)
        return inner(start, end, first)

    source._stream_range = stream
    assert fetcher.read(source, [node.chunks[0]], node.chunks) == [files["f05"][:CHUNK]]
    settled(fetcher)
    assert fetcher.cached(node.chunks)
    assert sorted(ranges) == [(c[0].blob_start, c[2].blob_end), (c[3].blob_start, c[3].blob_end)]
    assert events[:3] == [("asked", c[3].blob_start), ("answered", c[3].blob_start), ("asked", c[0].blob_start)]
    ranges.clear()  # a miss in the end itself, or with nothing between it and the end: one request
    other = view.lookup(["f06"])
    fetcher.read(source, [other.chunks[2]], other.chunks)
    settled(fetcher)
    assert ranges == [(other.chunks[2].blob_start, other.chunks[3].blob_end)]
    ranges.clear()  # nor once the background fetch streams the blob: what comes first is wanted first
    source.filling = True
    third = view.lookup(["f08"])
    fetcher.read(source, [third.chunks[0]], third.chunks)
    settled(fetcher)
    assert ranges == [(third.chunks[0].blob_start, third.chunks[3].blob_end)]


def test_what_a_miss_starts_finds_the_files_chunks_already_in_flight(tmp_path, registry, layer_source):
    """``on_miss`` (the startup prediction reading the program's header) runs once the miss and
    its read-ahead are claimed: its own read waits for them, instead of fetching a chunk first,
    alone, and leaving the container's read without the rest of the file."""
    make, view, files, layer = layer_source
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path), readahead_max=0, file_readahead=8 << 20), make()
    node, data = view.lookup(["f07"]), files["f07"]
    mark = registry.mark()
    predicted = []

    def predict():  # the prediction's first reads: the header, then the end (the dynamic section)
        predicted.append(fetcher.read(source, [node.chunks[-1]], warming=True))

    assert fetcher.read(source, [node.chunks[0]], node.chunks, on_miss=predict) == [data[:CHUNK]]
    assert predicted == [[data[3 * CHUNK:]]]
    settled(fetcher)
    assert served(registry, mark, layer.digest)[0] == 1
    fetcher.read(source, [node.chunks[0]], node.chunks, on_miss=lambda: pytest.fail("a cached read predicts"))
    other = view.lookup(["f09"])  # and what a miss starts failing fails nothing

    def broken():
        raise RuntimeError("no prediction")
    assert fetcher.read(source, [other.chunks[0]], on_miss=broken) == [files["f09"][:CHUNK]]


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


def test_the_stores_own_reads_leave_the_containers_read_ahead_alone(tmp_path, layer_source):
    """A warming read (the prediction parsing an ELF header) far from where a container reads the
    layer front to back neither collapses its read-ahead nor stops its streaming, nor reads ahead."""
    make, view, files, layer = layer_source
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path), readahead_min=CHUNK, readahead_max=16 * CHUNK), make()
    names = sorted(files)
    for name in names[:4]:
        read_file(fetcher, source, view, name)
    assert source.streaming
    far = view.lookup([names[-1]]).chunks[2]
    assert fetcher.read(source, [far], warming=True)
    settled(fetcher)
    assert source.streaming and not fetcher.cached([view.lookup([names[-1]]).chunks[3]])
    fetcher.read(source, [view.lookup([names[-3]]).chunks[1]])  # a container's jump does collapse it
    assert not source.streaming


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
    assert fetcher.fetch_claims(make(piece), fetcher.claim(wanted)[0]) is None
    settled(fetcher)
    assert fetcher.requests == 1
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
    assert isinstance(fetcher.fetch_claims(source, fetcher.claim(chunks)[0]), RegistryError)
    settled(fetcher)
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
    settled(fetcher)


def test_a_failure_between_claim_and_fetch_answers_every_claim(tmp_path, layer_source):
    make, view, files, _ = layer_source
    fetcher = ChunkFetcher(ChunkCache(tmp_path), wait_timeout=5.0)
    broken = make()
    broken.after = lambda *a: 1 / 0  # choosing the read-ahead fails: the read goes on without it
    assert read_file(fetcher, broken, view, "f04") == files["f04"]
    broken.stream_range = lambda *a: [][1]  # not a registry error: an unexpected one
    with pytest.raises(IndexError):
        read_file(fetcher, broken, view, "f05")
    settled(fetcher)
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


@pytest.mark.parametrize("tier", ["memory", "disk"])
def test_a_cached_chunk_another_toc_gives_another_size_is_refused_never_cut(tmp_path, registry, layer_source, tier):
    """The cache is keyed by digest alone: a TOC naming a cached chunk's digest with another size gets an
    error for that read, not the chunk's true bytes cut or padded to the size it claims."""
    make, view, files, layer = layer_source
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path, memory_bytes=8 * CHUNK if tier == "memory" else 0)), make()
    chunk = view.lookup(["f05"]).chunks[2]
    want = files["f05"][chunk.offset + 10:chunk.offset + 20]
    assert fetcher.read_span(source, [chunk], chunk.offset + 10, chunk.offset + 20) == want
    assert fetcher.cache.flush()
    lying = dataclasses.replace(chunk, size=chunk.size - 1)
    with pytest.raises(VerificationError):
        fetcher.read_span(source, [lying], chunk.offset + 10, chunk.offset + 20)
