"""Wall-clock deadlines for registry requests.

Socket timeouts bound each wait for data, not their sum: a registry (or
anything between us and it) that sends its answer a byte at a time, each
byte inside the read timeout, would hold a request, and the FUSE read behind
it, for hours. ``requests`` has no total timeout, so a watchdog thread shuts
down the socket of a request whose deadline has passed while it waits for
the response head; the read then fails like a dropped connection. Bodies are
bounded by the reader checking the deadline between pieces (pull.py).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from typing import Iterator

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_local = threading.local()


@contextlib.contextmanager
def request_deadline(at: float) -> Iterator[None]:
    """Requests made by this thread inside the block end by ``at`` (time.monotonic())."""
    outer = getattr(_local, "deadline", None)
    _local.deadline = at if outer is None else min(at, outer)
    try:
        yield
    finally:
        _local.deadline = outer


def current_deadline() -> float | None:
    return getattr(_local, "deadline", None)


class _Watchdog:
    """One thread, a heap of (deadline, token): expired sockets are shut down, never closed here
    (closing an fd another thread is reading could hand its number to a new socket)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._socks: dict[int, socket.socket] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self.expired = 0

    def watch(self, sock: socket.socket, at: float) -> int:
        with self._lock:
            token = next(self._tokens)
            self._socks[token] = sock
            heapq.heappush(self._heap, (at, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="als-deadline", daemon=True)
                self._thread.start()
            self._lock.notify()
        return token

    def cancel(self, token: int) -> None:
        with self._lock:
            self._socks.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._heap and self._heap[0][1] not in self._socks:
                    heapq.heappop(self._heap)  # cancelled
                wait = self._heap[0][0] - time.monotonic() if self._heap else 60.0
                if wait > 0:
                    self._lock.wait(min(wait, 60.0))
                    continue
                _, token = heapq.heappop(self._heap)
                sock = self._socks.pop(token, None)
                if sock is not None:
                    self.expired += 1
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


WATCHDOG = _Watchdog()


class _Watched:
    """A connection whose wait for the response head ends at the thread's request deadline."""

    def getresponse(self, *args, **kwargs):
        at, sock = current_deadline(), getattr(self, "sock", None)
        if at is None or sock is None:
            return super().getresponse(*args, **kwargs)
        token = WATCHDOG.watch(sock, at)
        try:
            return super().getresponse(*args, **kwargs)
        finally:
            WATCHDOG.cancel(token)


class WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class WatchedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = WatchedHTTPConnection


class WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = WatchedHTTPSConnection


def install(session) -> None:
    """Make every connection ``session``'s adapters open a watched one."""
    for adapter in session.adapters.values():
        manager = getattr(adapter, "poolmanager", None)
        if manager is not None:
            manager.pool_classes_by_scheme = {"http": WatchedHTTPConnectionPool,
                                              "https": WatchedHTTPSConnectionPool}
