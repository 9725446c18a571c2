"""Blob reads started before a layer's build asks for them: the first range each layer's TOC needs,
or the gzip index it names.

A layer's build cannot start before its image's config is in (the config
pairs each layer with its DiffID), but what it reads first (an eStargz
tail, a zstd:chunked manifest) depends only on the layer's descriptor in
the image manifest. So those reads start as soon as the manifest is known,
side by side with the config and each other, and the build takes the bytes
when it gets there. The layer Podman looks up first is named by its blob
digest before even the manifest is in: its tail (the footer and, most
often, the whole TOC of an eStargz blob) can be read at once, blob size
unknown, with a suffix range (``start_tail``).

A read nobody takes (its layer was held in memory already, the image failed
to resolve, the guess was wrong) is dropped when its resolution says so,
and in any case after ``MAX_AGE`` seconds; a read that failed is simply not
taken, and the build reads again and reports what goes wrong itself.
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
    answer: Future  # the pool's: (where the bytes start in the blob, the bytes) or None, an exception, or cancelled
    tail: int = 0  # a suffix read of this many bytes (start_tail), else 0
    started: float = field(default_factory=time.monotonic)


class EarlyReads:
    """Blob ranges read ahead of the builds that want them, one per (reference, blob)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="als-early-read")
        self._lock = threading.Lock()
        self._reads: dict[Key, _Read] = {}
        # When each key's read last started: a guessed tail is never started for a key whose build
        # has read (or taken) its bytes already, however late the guess comes.
        self._started: dict[Key, float] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._reads.clear()
            self._started.clear()

    def start(self, key: Key, start: int, end: int, read: Callable[[int, int], bytes]) -> None:
        """Read blob bytes [start, end) with ``read`` now, for a later ``take``; once per key."""
        self._start(key, 0, lambda: (start, read(start, end)))

    def start_tail(self, key: Key, length: int, read_tail: Callable[[int], tuple[int, bytes] | None]) -> None:
        """Read the blob's last ``length`` bytes with ``read_tail`` (-> where they start and the bytes,
        or None if they cannot be had so). Not if a read of ``key`` was started already: the guess
        would come after the manifest, whose read ahead knows exactly what to read."""
        self._start(key, length, lambda: read_tail(length))

    def _start(self, key: Key, tail: int, read: Callable[[], tuple[int, bytes] | None]) -> None:
        now = time.monotonic()
        with self._lock:
            for k in [k for k, r in self._reads.items() if now - r.started > MAX_AGE]:
                del self._reads[k]
            for k in [k for k, t in self._started.items() if now - t > MAX_AGE]:
                del self._started[k]
            if key in self._reads or (tail and key in self._started):
                return
            try:
                self._reads[key] = _Read(self._pool.submit(read), tail)
            except RuntimeError:  # shut down: nothing to read ahead for
                return
            self._started[key] = now

    def start_blob(self, key: Key, fetch: Callable[[], bytes]) -> None:
        """Fetch a whole blob with ``fetch`` now (a gzip index the manifest names), for ``take_blob``."""
        self._start(key, 0, lambda: (0, fetch()))

    def tail_length(self, key: Key) -> int:
        """The length of the suffix read under way for ``key`` (start_tail), or 0."""
        with self._lock:
            pending = self._reads.get(key)
        return pending.tail if pending is not None else 0

    def take(self, key: Key, start: int, end: int) -> bytes | None:
        """The bytes read ahead for exactly [start, end) of ``key``, waiting for them if under way;
        None if there are none, the read failed, or it read other bytes. A read is taken once."""
        answer = self._answer(key)
        if answer is None:
            return None
        at, data = answer
        return data if (at, at + len(data)) == (start, end) else None

    def take_blob(self, key: Key) -> bytes | None:
        """The blob fetched ahead for ``key`` (start_blob), waiting for it if under way; None if there
        is none or the fetch failed. Taken once."""
        answer = self._answer(key)
        return answer[1] if answer is not None else None

    def _answer(self, key: Key) -> tuple[int, bytes] | None:
        with self._lock:
            pending = self._reads.pop(key, None)
        if pending is None:
            return None
        # A registry read is bounded by its retry deadline, so this wait is too.
        try:
            return pending.answer.result()  # None: not to be had so
        except Exception:  # failed or cancelled: the build reads again and reports it
            return None

    def discard(self, key: Key) -> None:
        """Nobody will take ``key``'s read: forget it (a read under way finishes unseen)."""
        with self._lock:
            pending = self._reads.pop(key, None)
        if pending is not None:
            pending.answer.cancel()  # if it has not started yet

    def discard_image(self, ref: str, keep: set[str]) -> None:
        """Forget the reads for ``ref``'s blobs but those in ``keep`` (its resolution knows no others)."""
        with self._lock:
            gone = [k for k in self._reads if k[0] == ref and k[1] not in keep]
        for k in gone:
            self.discard(k)

    def pending(self) -> list[Key]:
        """The keys read ahead and not taken yet."""
        with self._lock:
            return list(self._reads)
