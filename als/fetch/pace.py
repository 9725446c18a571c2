"""When the background fetch may use the link (and the CPU): when no container needs them.

A container's first reads miss one after another, each a round trip; a
background request on the same link (4 MiB is 170 ms at 200 Mbit/s) makes
every one of them wait behind it, and its decoding takes a core from the
starting container. So the fetcher counts what the foreground does
(``Foreground``: container reads, and the fetches in flight for them, for
the startup prediction and for prefetches), and the background fetch of a
newly resolved layer waits for a container to start reading it (a pull ends
before its container starts), then for the start-up burst to go quiet; later
it pauses while any foreground fetch is in flight, unless a container is
streaming the layer (reading it front to back: it wants all of it, and a
background fetch that pauses for its every miss only makes it wait on the
network more often). Every wait is bounded
(``Pace.delay``): an image pulled and not run is still fetched, and a
container that never stops reading cannot starve the background fetch.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

POLL = 0.05  # seconds between looks at what the foreground does, while the background fetch waits


@dataclass(frozen=True)
class Pace:
    """``quiet``: seconds without a container read or a foreground fetch before the background
    fetch starts; ``delay``: the longest each of its waits lasts."""

    quiet: float = 0.0
    delay: float = 10.0


class Foreground:
    """Container reads so far and the foreground fetches in flight; thread-safe.

    ``reads`` and ``busy_at`` are also written without the lock, on a cached
    read (the hot path): a stale value only moves a background request by one
    look.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.in_flight = 0  # foreground fetches: container reads, prediction, prefetch
        self.reads = 0  # container reads, cached or not
        self.busy_at = time.monotonic()  # the last container read, or the end of a foreground fetch

    def read_cached(self) -> None:
        """A container read served without the network."""
        self.reads += 1
        self.busy_at = time.monotonic()

    @contextmanager
    def fetch(self, container: bool = False) -> Iterator[None]:
        """A fetch the background fetch yields to, for as long as it runs; ``container``: for a
        container's read (counted with the fetch, so a waiter never sees the read without it)."""
        with self._cond:
            self.in_flight += 1
            if container:
                self.reads += 1
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= 1
                self.busy_at = time.monotonic()
                self._cond.notify_all()

    def wait_start(self, stop: threading.Event, pace: Pace, since: int, streaming: Callable[[], bool]) -> None:
        """Wait for a container read after ``since`` reads, then for ``pace.quiet`` seconds without
        foreground activity; each wait at most ``pace.delay``. A container ``streaming`` the
        layer (reading it front to back, its read-ahead at its largest) ends the wait: it wants
        all of it, and the background fetch helps it rather than hinders it."""
        deadline = time.monotonic() + pace.delay
        with self._cond:
            while self.reads == since and not stop.is_set() and time.monotonic() < deadline:
                self._cond.wait(POLL)
            deadline = time.monotonic() + pace.delay
            while not stop.is_set() and not streaming():
                now = time.monotonic()
                if now >= deadline or (not self.in_flight and now - self.busy_at >= pace.quiet):
                    return
                self._cond.wait(min(POLL, deadline - now))

    def wait_idle(self, stop: threading.Event, pace: Pace) -> None:
        """Wait while a foreground fetch is in flight, at most ``pace.delay``."""
        deadline = time.monotonic() + pace.delay
        with self._cond:
            while self.in_flight and not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(min(2 * POLL, left))
