"""The background fetch against a real registry: every chunk once, in batches that keep the link
full, yielding to containers, and holding no chunk longer than its readers need it."""

from __future__ import annotations

import threading
import time

from als.fetch.background import fill
from als.fetch.cache import ChunkCache
from als.fetch.fetcher import ChunkFetcher
from als.fetch.pace import Pace
from tests.fetch.support import CHUNK, InFlight, Recording, in_thread, read_file, reads_stay_local, served


def test_background_fetches_every_chunk_once_then_reads_stay_local(tmp_path, registry, layer_source):
    make, view, files, layer = layer_source
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path)), make()
    mark = registry.mark()
    fetched = fill(fetcher, source, threading.Event(), step=256 << 10)
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
    t = threading.Thread(target=fill, args=(fetcher, make(), stop))
    t.start()
    t.join(0.5)
    assert t.is_alive() and fetcher.bytes_fetched == 0
    in_flight.__exit__(None, None, None)
    t.join(30)
    assert not t.is_alive() and fetcher.bytes_fetched > 0


def test_background_waits_for_a_container_read_and_for_its_fetch_to_end(tmp_path, layer_source):
    make, view, files, layer = layer_source
    fetcher = ChunkFetcher(ChunkCache(tmp_path), readahead_max=0)
    rec = Recording(make())
    since = fetcher.container_reads()  # the layer resolved: no container has read it yet
    bg = in_thread("background", fill, fetcher, rec.source, threading.Event(), 256 << 10,
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
    fill(fetcher, source, threading.Event(), step=16 << 20)
    assert served(registry, mark, layer.digest)[0] == 1  # one request across them, not one per hole
    assert fetcher.cached(source.chunks)
    reads_stay_local(registry, fetcher, source, view, files, layer.digest)


def test_background_keeps_two_requests_in_flight_while_a_container_streams_the_layer(tmp_path, layer_source):
    make, view, files, layer = layer_source
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path)), make()
    source.streaming = True  # a container reads it front to back, waiting on the background fetch
    second = threading.Event()

    def hold(n):
        if n == 2:
            second.set()
        second.wait(2)  # the first request is still in flight when the next one starts
    requests = InFlight(source, hold)
    fill(fetcher, source, threading.Event(), step=256 << 10)
    assert requests.most == 2 and fetcher.cached(source.chunks)


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
    bg = in_thread("background", fill, fetcher, source, threading.Event(), 256 << 10)
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
    bg = in_thread("background", fill, fetcher, source, threading.Event(), 256 << 10,
                   pace=Pace(quiet=0.0, delay=0.05), since=fetcher.container_reads())
    bg.join(30)
    assert not bg.is_alive() and fetcher.cached(source.chunks)


def test_a_container_streaming_the_layer_starts_the_background_without_waiting_for_quiet(tmp_path, layer_source):
    make, view, files, layer = layer_source
    fetcher = ChunkFetcher(ChunkCache(tmp_path), readahead_min=CHUNK, readahead_max=2 * CHUNK)
    source = make()
    bg = in_thread("background", fill, fetcher, source, threading.Event(), 256 << 10,
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
        bg = in_thread("background", fill, fetcher, source, threading.Event(), 256 << 10,
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
    bg = in_thread("background", fill, fetcher, rec.source, threading.Event(), 256 << 10,
                   pace=Pace(quiet=0.0, delay=60.0))
    rec.go.set()
    fg.join(30)
    bg.join(30)
    assert not bg.is_alive()
    assert rec.names()[:2] == ["foreground", "foreground done"]


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
        fetched = fill(fetcher, source, threading.Event(), step=64 << 20)  # one batch, one request
    finally:
        tracemalloc.stop()
    assert fetched >= total and seen
    assert seen[0] < 1 << 20, f"{seen[0]} bytes held of {len(files) * 4 * CHUNK} decoded"


def test_background_sends_one_request_at_a_time_unless_a_container_streams_the_layer(tmp_path, layer_source):
    """A container's next miss would wait behind every background request on the link, and on a
    fast link each request keeps a core busy inflating: one at a time, unless a container waits
    on the background fetch (streaming the layer)."""
    make, view, files, layer = layer_source
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path)), make()
    requests = InFlight(source, lambda n: time.sleep(0.05))  # time for a second to start beside it, were one sent
    fill(fetcher, source, threading.Event(), step=256 << 10)
    assert requests.most == 1 and fetcher.cached(source.chunks)


def test_a_background_fetch_cut_short_lets_programs_be_predicted_again(tmp_path, layer_source):
    """While the pass runs, the startup predictor stands aside (``filling``); once a registry failure
    has ended it, the layer's next containers are predicted for again."""
    from als.errors import RegistryError
    make, view, files, layer = layer_source
    fetcher, source = ChunkFetcher(ChunkCache(tmp_path)), make()
    real, seen = source.stream_range, []

    def failing(start, end, sink):  # the registry answers the first request, then goes away
        seen.append(source.filling)
        if len(seen) > 1:
            raise RegistryError("connection reset")
        return real(start, end, sink)
    source.stream_range = failing
    fetched = fill(fetcher, source, threading.Event(), step=256 << 10)
    assert 0 < fetched < layer.size and seen[:2] == [True, True]
    assert not source.filling
