"""What the fetch tests share: reading a test layer's files, counting what the registry sent,
recording the requests a source makes."""

from __future__ import annotations

import threading
import time

from als.fetch.source import BlobSource

CHUNK = 64 << 10


def served(registry, mark, digest):
    got = [a for a in registry.accesses_since(mark) if a.method == "GET" and a.uri.endswith(digest)]
    return len(got), sum(a.written for a in got)


def reads_stay_local(registry, fetcher, source, view, files, digest):
    """Every file reads back right, and nothing more is asked of the registry."""
    mark = registry.mark()
    for name, data in files.items():
        assert read_file(fetcher, source, view, name) == data
    assert served(registry, mark, digest) == (0, 0)


def settled(fetcher, timeout: float = 10.0) -> None:
    """Wait, bounded, until no chunk is in flight: a read is answered once its own chunks are in,
    and what its request brings along arrives after it."""
    deadline = time.monotonic() + timeout
    while fetcher.inflight() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fetcher.inflight() == 0, "fetches still in flight"


def read_file(fetcher, source, view, name):
    node = view.lookup([name])
    return b"".join(fetcher.read(source, node.chunks_for(0, node.size)))


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
            if name.startswith("foreground"):  # the reader's thread, or the one it fetches on
                name = "foreground"
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


class InFlight:
    """Counts the requests a source has in flight at once (``most``); ``hold(n)`` runs inside each,
    ``n`` being how many are in flight with it."""

    def __init__(self, source: BlobSource, hold):
        self.most = 0
        self._now = 0
        lock = threading.Lock()
        inner = source._stream_range

        def stream(start, end, sink):
            with lock:
                self._now += 1
                self.most = max(self.most, self._now)
                n = self._now
            hold(n)
            try:
                return inner(start, end, sink)
            finally:
                with lock:
                    self._now -= 1
        source._stream_range = stream
