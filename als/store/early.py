"""Blob reads started before a layer's build asks for them: the first range each layer's TOC needs.

A layer's build cannot start before its image's config is in (the config
pairs each layer with its DiffID), but what it reads first (an eStargz
tail, a zstd:chunked manifest) depends only on the layer's descriptor in
the image manifest. So those reads start as soon as the manifest is known,
side by side with the config and each other, and the build takes the bytes
when it gets there: one round trip less on every cold resolve.

A read nobody takes (its layer was held in memory already, or the image
failed to resolve) is dropped when its resolution says so, and in any case
after ``MAX_AGE`` seconds; a read that failed is simply not taken, and the
build reads again and reports what goes wrong itself.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

MAX_AGE = 120.0  # seconds an untaken read is kept
WORKERS = 4  # reads in flight at once, apart from the resolver's own threads (whose builds wait on them)

Key = tuple[str, str]  # (image reference, blob digest)


@dataclass
class _Read:
    start: int
    end: int
    answer: Future  # the pool's: bytes [start, end) of the blob, an exception, or cancelled at close
    started: float = field(default_factory=time.monotonic)


class EarlyReads:
    """Blob ranges read ahead of the builds that want them, one per (reference, blob)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="als-early-read")
        self._lock = threading.Lock()
        self._reads: dict[Key, _Read] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._reads.clear()

    def start(self, key: Key, start: int, end: int, read: Callable[[int, int], bytes]) -> None:
        """Read blob bytes [start, end) with ``read`` now, for a later ``take``; once per key."""
        now = time.monotonic()
        with self._lock:
            for k in [k for k, r in self._reads.items() if now - r.started > MAX_AGE]:
                del self._reads[k]
            if key in self._reads:
                return
            try:
                self._reads[key] = _Read(start, end, self._pool.submit(read, start, end))
            except RuntimeError:  # shut down: nothing to read ahead for
                pass

    def take(self, key: Key, start: int, end: int) -> bytes | None:
        """The bytes read ahead for exactly [start, end) of ``key``, waiting for them if under way;
        None if there are none or the read failed. A read is taken once."""
        with self._lock:
            pending = self._reads.get(key)
            if pending is None or (pending.start, pending.end) != (start, end):
                return None
            del self._reads[key]
        # A registry read is bounded by its retry deadline, so this wait is too.
        try:
            return pending.answer.result()
        except Exception:  # failed or cancelled: the build reads again and reports it
            return None

    def discard(self, key: Key) -> None:
        """Nobody will take ``key``'s read: forget it (a read under way finishes unseen)."""
        with self._lock:
            pending = self._reads.pop(key, None)
        if pending is not None:
            pending.answer.cancel()  # if it has not started yet

    def pending(self) -> list[Key]:
        """The keys read ahead and not taken yet."""
        with self._lock:
            return list(self._reads)
