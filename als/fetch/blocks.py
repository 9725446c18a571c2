"""Block digests of cached chunks: a page the kernel dropped is read back without hashing its whole chunk.

The kernel keeps what containers read in its page cache, but memory
pressure (or a host's proactive reclaim) drops those pages one by one, and
each dropped page comes back to the store as a FUSE read of a few KiB. The
chunk cache hashes every disk read against the chunk's digest, which for a
single page meant reading and hashing the whole chunk: up to 4 MiB with
sgz's chunk size, 2.3 ms of SHA-256 for 4 KiB.

The same holds for a program's pages on its first start, which the kernel
faults in out of order across chunks that no longer fit the cache's small
memory tier: the optimized image's run read and hashed 12.6 MB of whole
chunks from disk to serve 7.7 MB of reads, 57 ms of the store's time.

So a chunk the cache's writer puts on disk also gets the SHA-256 of each of its
``BLOCK``-byte blocks, computed from the verified bytes and kept in memory
only: a table on disk could be rewritten along with the bytes it vouches
for. A range (one not from the chunk's start: ChunkCache.get) is then served
by reading and hashing just the blocks it lies in. A chunk without a table
(on disk before the store started, its table evicted, or a chunk of up to
``WHOLE`` bytes) is read and hashed whole.
"""

from __future__ import annotations

import hashlib
import threading

from cachetools import LRUCache

# 16 KiB: a dropped page read back cost 112 us as a FUSE read with 64 KiB blocks
# (SHA-256 of 64 KiB is 36 us of it) and 80 us with 16 KiB ones; a native one, 50 us.
BLOCK = 16 << 10
# A chunk of up to two blocks gets no table: reading it whole costs 9 us more at most,
# and a table costs about 200 bytes however short (two fifths of the tables of a Debian /usr).
WHOLE = 2 * BLOCK
DIGEST = 32  # bytes of a raw SHA-256
TABLE_MEMORY = 2 << 20  # tables for up to 1 GiB of chunks (32 bytes per block)


class BlockTables:
    """The block digests of recently written chunks, by chunk digest, least recently used dropped first."""

    def __init__(self, memory: int = TABLE_MEMORY):
        self._tables: LRUCache = LRUCache(maxsize=max(memory, 1), getsizeof=len)
        self._lock = threading.Lock()

    def add(self, digest: str, data: bytes) -> None:
        """Keep the block digests of chunk ``digest``, whose ``data`` the caller has verified (not for
        a chunk of up to ``WHOLE`` bytes)."""
        if len(data) <= WHOLE:
            return
        view = memoryview(data)
        table = b"".join(hashlib.sha256(view[i:i + BLOCK]).digest() for i in range(0, len(data), BLOCK))
        with self._lock:
            self._tables[digest] = table

    def span(self, digest: str, start: int, end: int) -> tuple[int, int] | None:
        """The block-aligned byte range of chunk ``digest`` that holds ``[start, end)``, or None if its
        block digests are not known (or the range is empty)."""
        with self._lock:
            table = self._tables.get(digest)
        if table is None or not 0 <= start < end:
            return None
        last = len(table) // DIGEST
        first, stop = start // BLOCK, min(-(-end // BLOCK), last)
        if first >= stop:
            return None
        return first * BLOCK, stop * BLOCK

    def check(self, digest: str, start: int, raw: bytes) -> bool:
        """Whether ``raw``, chunk ``digest``'s bytes from block boundary ``start`` on, matches its block
        digests (the chunk's last block may be short)."""
        with self._lock:
            table = self._tables.get(digest)
        if table is None or start % BLOCK or not raw:
            return False
        view, first = memoryview(raw), start // BLOCK
        for n, i in enumerate(range(0, len(raw), BLOCK), first):
            if hashlib.sha256(view[i:i + BLOCK]).digest() != table[n * DIGEST:(n + 1) * DIGEST]:
                return False
        return True

    def drop(self, digests) -> None:
        with self._lock:
            for d in digests:
                self._tables.pop(d, None)
