"""The chunk cache: verified, uncompressed chunks keyed by their digest.

Keying by content digest means identical chunks in different layers and images
are stored once, and an entry can always be checked: every disk read is hashed
again, so a torn write, a bit flip or a planted file is never served; the pack
it lies in is dropped and its chunks are fetched again. Chunks are appended to
large pack files (als/fetch/packs.py: why, and how a crash at any moment
leaves no half chunk readable) by a writer thread, off the read path. A small
in-memory tier serves the many small FUSE reads that land in one chunk without
re-reading and re-hashing it, and a read within a chunk but not from its start
(a page the kernel dropped, a program's page) reads and hashes only the
blocks it lies in (als/fetch/blocks.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cachetools import LRUCache

from als.digest import is_sha256, sha256_digest
from als.fetch.blocks import BlockTables
from als.fetch.memory import release_free_memory
from als.fetch.packs import NAME, Pack, Record
from als.files import private_dir

log = logging.getLogger("als.cache")

# Chunk bytes a pack holds before the next one is started (eviction drops whole packs: with a small
# cache.max_bytes, packs are a sixteenth of it instead).
PACK_BYTES = 64 << 20
# Chunks the writer appends at once: one write of their bytes, one of their records.
WRITE_BATCH = 64


@dataclass
class CacheStats:
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    corrupt: int
    evicted: int


class ChunkCache:
    """Chunks on disk in packs under ``root/packs``, with a byte limit and eviction of whole packs.

    The index (digest -> pack, offset, length) lives in memory, rebuilt from
    the packs' index files at start. Packs are kept in least-recently-used
    order (writing or reading one of its chunks uses a pack; across a restart,
    its file's access and modification times tell) and eviction removes whole
    packs, least recently used first. Eviction only removes files: a reader
    that is waiting for a chunk gets it from the fetch that produced it, and
    one reading a pack as it goes still reads it through its open file.

    Writes happen on a writer thread, off the read path: a verified chunk is
    served from memory (``_pending``) until it is on disk. Past
    ``pending_bytes`` waiting, ``put`` writes itself, or, if another thread is
    appending, leaves the chunk out: memory stays bounded however many
    readers there are.
    """

    def __init__(self, root: Path, memory_bytes: int = 32 << 20, max_bytes: int = 0,
                 pending_bytes: int = 16 << 20):
        self.root = private_dir(Path(root))  # private (0700): `blob` exports spool here too (als/store/blob.py)
        self._drop_old_format()
        self.dir = private_dir(self.root / "packs")
        self.max_bytes = max_bytes  # 0: no limit
        self.pack_bytes = min(PACK_BYTES, max(max_bytes // 16, 1)) if max_bytes else PACK_BYTES
        self._mem: LRUCache = LRUCache(maxsize=max(memory_bytes, 1), getsizeof=len)
        self.blocks = BlockTables()  # block digests of chunks written since the start
        self._lock = threading.Lock()
        self._write_lock = threading.RLock()  # appending to the current pack; removing packs
        self._index: dict[str, tuple[Pack, int, int]] = {}
        self._packs: OrderedDict[int, Pack] = OrderedDict()  # least recently used first
        self._current: Pack | None = None  # the pack being appended to
        self._next_number = 0
        self._disk_bytes = 0
        self.hits = self.misses = self.corrupt = self.evicted = 0
        self.skipped = 0  # chunks left out of the disk cache while the writer was behind and busy
        self._load()
        self._pending: dict[str, bytes] = {}
        self._pending_size = 0
        self._room = threading.Condition(self._lock)  # notified as the writer empties _pending
        self.pending_bytes = pending_bytes
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="als-cache-writer", daemon=True)
        self._writer.start()

    def _drop_old_format(self) -> None:
        """Remove the cache of earlier versions (a file per chunk under ``chunks/``): not migrated,
        its chunks are fetched again as they are needed."""
        old = self.root / "chunks"
        if old.is_dir() and not old.is_symlink():
            log.info("chunk cache: removing %s, the cache of an earlier version (a file per chunk); "
                     "chunks are fetched again as needed", old)
            shutil.rmtree(old, ignore_errors=True)

    def _load(self) -> None:
        kinds: dict[int, set[str]] = {}
        for entry in os.scandir(self.dir):
            m = NAME.fullmatch(entry.name)
            if m is None or not entry.is_file(follow_symlinks=False):
                log.info("chunk cache: removing %s, which is not part of a pack", entry.path)
                with contextlib.suppress(OSError):
                    shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
                continue
            kinds.setdefault(int(m[1], 16), set()).add(m[2])
        found = []
        for number, have in kinds.items():
            self._next_number = max(self._next_number, number + 1)
            if "index" not in have:  # bytes no record names: nothing can be served from them
                Pack(self.dir, number, 0).remove()
                continue
            try:
                loaded = Pack.load(self.dir, number)
            except OSError as e:
                log.warning("chunk cache: cannot read pack %d: %s; leaving it out", number, e)
                continue
            if loaded is None:
                log.info("chunk cache: removed pack %d: incomplete or of another format", number)
                continue
            pack, records = loaded
            if not records and not pack.foreign:
                pack.remove()
                continue
            found.append((pack.last_used(), number, pack, records))
        for _, _, pack, records in sorted(found, key=lambda f: (f[0], f[1])):
            self._add(pack, records)
        self._evict()

    def _add(self, pack: Pack, records: list[Record]) -> None:
        """Serve ``records`` from ``pack``, which becomes the most recently used.

        Of two copies of a chunk (a chunk fetched again after its pack was
        left out, say), the one in the newer pack is served: every process
        opening the cache picks the same copy, whatever the packs' times say.
        """
        with self._lock:
            if pack.number not in self._packs:
                self._packs[pack.number] = pack
                self._disk_bytes += pack.size
            self._packs.move_to_end(pack.number)
            for r in records:
                entry = self._index.get(r.digest)
                if entry is None or entry[0].number < pack.number:
                    self._index[r.digest] = (pack, r.offset, r.length)
                    pack.digests.append(r.digest)

    def contains(self, digest: str) -> bool:
        """Cached on disk or in memory (not verified: a later ``get`` still checks)."""
        return digest in self._index or digest in self._mem or digest in self._pending

    def location(self, digest: str) -> tuple[Path, int, int] | None:
        """Where a chunk lies on disk (pack file, offset, length), or None: for tools and tests."""
        entry = self._index.get(digest)
        return None if entry is None else (entry[0].data_path, entry[1], entry[2])

    def get(self, digest: str, start: int = 0, end: int | None = None, size: int | None = None) -> bytes | None:
        """The verified chunk, or its bytes ``[start, end)``; None if it is not cached (or was corrupt),
        or if ``size`` is given and the cached chunk is not that long.

        From disk, a whole chunk is hashed against its digest, and so is a
        range from its start: a reader going on into the chunk (a file read
        from its beginning, a read-ahead), whose next reads the memory tier
        then answers. Any other range of a chunk whose block digests are known
        (a page the kernel dropped, a program's page faulted in out of order)
        costs only the blocks it lies in (als/fetch/blocks.py), and is not
        kept in the memory tier.
        """
        with self._lock:
            data = self._mem.get(digest) or self._pending.get(digest)
            entry = self._index.get(digest)
            if entry is not None and entry[0].number in self._packs:
                self._packs.move_to_end(entry[0].number)
        known = len(data) if data is not None else entry[2] if entry is not None else None
        if size is not None and known is not None and known != size:
            return None  # not the length the caller's TOC gives: it refuses the chunk (ChunkFetcher._sized)
        if data is not None:
            self.hits += 1
            return data[start:end]
        if entry is None:
            self.misses += 1
            return None
        pack, offset, length = entry
        span = self.blocks.span(digest, start, min(end, length)) if start and end is not None else None
        lo, hi = (span[0], min(span[1], length)) if span else (0, length)
        try:
            raw = pack.read(offset + lo, hi - lo)
        except OSError as e:
            log.warning("chunk cache: cannot read chunk %s from pack %d: %s; dropping the pack", digest,
                        pack.number, e)
            self._drop(pack)
            self.misses += 1
            return None
        if not (self.blocks.check(digest, lo, raw) if span else sha256_digest(raw) == digest):
            self.corrupt += 1
            log.warning("chunk cache: chunk %s in pack %d does not match its digest; dropping the pack "
                        "(its chunks are fetched again)", digest, pack.number)
            self._drop(pack)
            return None
        self.hits += 1
        if span is None:
            self._remember(digest, raw)
        return raw[start - lo:None if end is None else end - lo]

    def put(self, digest: str, data: bytes) -> None:
        """Store a chunk the caller has verified. A full disk is logged, not fatal."""
        self._remember(digest, data)
        if not is_sha256(digest):
            return  # packs name chunks by sha256 (the only digest a chunk is verified against)
        with self._lock:
            if digest in self._index or digest in self._pending:
                return
            if self._pending_size + len(data) <= self.pending_bytes:
                self._pending[digest] = data
                self._pending_size += len(data)
                self._queue.put(digest)
                return
        # The writer is behind: write here, which also slows the producer, if no one else is appending.
        # If someone is, this chunk stays out of the disk cache rather than wait, held, for its turn:
        # with many readers each waiting with a chunk, memory grew with the number of readers.
        if self._write_lock.acquire(blocking=False):
            try:
                self._store([(digest, data)])
            finally:
                self._write_lock.release()
        else:
            self.skipped += 1

    def wait_for_room(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until at most half of ``pending_bytes`` awaits the writer.

        For producers that can wait (the background fetch): pausing them while
        the disk is behind keeps ``put`` from writing inline on a container's
        read, and keeps the chunks waiting in memory well under the limit.
        """
        with self._room:
            return self._room.wait_for(lambda: self._pending_size <= self.pending_bytes // 2, timeout)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every accepted chunk is on disk (or failed to get there)."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> bool:
        """Write what waits, stop the writer and let go of the packs (their files stay, for the next
        start). Nothing may read the cache after this. Returns whether everything was written."""
        written = self.flush(timeout)
        self._queue.put(None)
        self._writer.join(timeout)
        with self._write_lock:
            self._current = None
            with self._lock:
                packs = list(self._packs.values())
                self._packs.clear()
                self._index.clear()
                self._disk_bytes = 0
        for pack in packs:
            pack.close()
        return written

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            batch: list[str] = []
            mark = None
            while True:  # what is queued already goes in one append
                if item is None:  # close()
                    return
                if isinstance(item, threading.Event):
                    mark = item
                    break
                batch.append(item)
                if len(batch) >= WRITE_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write_pending(batch)
            if mark is not None:
                mark.set()

    def _write_pending(self, digests: list[str]) -> None:
        with self._lock:
            chunks = [(d, self._pending[d]) for d in digests if d in self._pending]
        try:
            self._store(chunks)
        except Exception as e:  # the writer must outlive any failure: the chunks stay served from memory
            log.error("chunk cache: storing %d chunks failed: %s", len(chunks), e)
        for d, data in chunks:  # once on disk, a dropped page is read back by the block
            if d in self._index:
                self.blocks.add(d, data)
        with self._lock:
            for d, data in chunks:
                if self._pending.pop(d, None) is not None:
                    self._pending_size -= len(data)
            self._room.notify_all()
        chunks = data = None  # the writer holds no chunk while it waits for the next
        if self._queue.empty():
            release_free_memory()  # caught up: what it wrote is free now

    def _store(self, chunks: list[tuple[str, bytes]]) -> None:
        """Append ``chunks`` to the current pack; a full disk first evicts a tenth of the cache."""
        with self._write_lock:
            with self._lock:
                chunks = [(d, b) for d, b in chunks if d not in self._index]
            if not chunks:
                return
            err = self._append(chunks)
            if err in (errno.ENOSPC, errno.EDQUOT) and self._packs:
                # The disk is fuller than max_bytes assumed: make room (a tenth of the cache, least
                # recently used packs first) and try once more; the chunks are served from memory either way.
                size = sum(len(b) for _, b in chunks)
                freed = self.prune(self._disk_bytes - max(self._disk_bytes // 10, 4 * size))
                log.warning("chunk cache: the disk is full; evicted %d bytes to make room", freed)
                with self._lock:  # what went into a pack before the disk filled is there still
                    chunks = [(d, b) for d, b in chunks if d not in self._index]
                err = self._append(chunks)
            if err:
                log.warning("chunk cache: cannot store %d chunks: %s", len(chunks), os.strerror(err))
        if not err:
            self._evict()

    def _append(self, chunks: list[tuple[str, bytes]]) -> int:
        """0, or the errno that kept ``chunks`` from the disk. The caller holds the write lock.

        A pack takes chunks until it holds ``pack_bytes``; the rest go to the next one.
        """
        while chunks:
            room = self.pack_bytes - (self._current.size if self._current is not None else 0)
            n = 1
            while n < len(chunks) and len(chunks[n - 1][1]) < room:
                room -= len(chunks[n - 1][1])
                n += 1
            err = self._append_to_pack(chunks[:n])
            if err:
                return err
            chunks = chunks[n:]
        return 0

    def _append_to_pack(self, chunks: list[tuple[str, bytes]]) -> int:
        pack = self._current
        try:
            if pack is None:
                pack = self._new_pack()
            before = pack.size
            try:
                records = pack.append(chunks)
            finally:
                with self._lock:
                    self._disk_bytes += pack.size - before  # a failed append may leave bytes behind
        except OSError as e:
            return e.errno or errno.EIO
        self._add(pack, records)
        if pack.size >= self.pack_bytes:
            self._current = None
            pack.seal()
        return 0

    def _new_pack(self) -> Pack:
        for _ in range(16):
            number = self._next_number
            self._next_number += 1
            try:
                pack = Pack.create(self.dir, number)
            except FileExistsError:  # another process made that one
                continue
            self._add(pack, [])
            self._current = pack
            return pack
        raise OSError(errno.EEXIST, "no free pack number")

    def _drop(self, pack: Pack) -> int:
        """Stop serving from ``pack`` and delete it (unless another process writes it); returns how
        many chunks were served from it."""
        with self._write_lock:
            if pack is self._current:
                self._current = None
            with self._lock:
                if self._packs.pop(pack.number, None) is None:
                    return 0
                dropped = 0
                for d in pack.digests:
                    entry = self._index.get(d)
                    if entry is not None and entry[0] is pack:
                        del self._index[d]
                        dropped += 1
                self._disk_bytes -= pack.size
            self.blocks.drop(pack.digests)
            if pack.foreign:
                pack.seal()
            else:
                pack.remove()
            return dropped

    def stats(self) -> CacheStats:
        return CacheStats(entries=len(self._index), bytes=self._disk_bytes, max_bytes=self.max_bytes,
                          hits=self.hits, misses=self.misses, corrupt=self.corrupt, evicted=self.evicted)

    def prune(self, max_bytes: int) -> int:
        """Evict least recently used packs until at most ``max_bytes`` remain; return bytes freed."""
        before = self._disk_bytes
        self._evict(max_bytes)
        return before - self._disk_bytes

    def verify(self) -> tuple[int, int]:
        """Hash every chunk the cache would serve. A pack holding a corrupt one is dropped, its good
        chunks copied to a new pack first. Returns (checked, removed)."""
        checked = removed = 0
        with self._lock:
            packs = list(self._packs.values())
        for pack in packs:
            with self._lock:
                entries = [(d, e[1], e[2]) for d in pack.digests
                           if (e := self._index.get(d)) is not None and e[0] is pack]
            good = []
            for d, offset, length in entries:
                checked += 1
                with contextlib.suppress(OSError):
                    if sha256_digest(pack.read(offset, length)) == d:
                        good.append((d, offset, length))
            if len(good) == len(entries):
                continue
            removed += len(entries) - len(good)
            self._drop(pack)  # its file stays readable through the pack's open descriptor
            if pack.foreign:  # a running store writes it, and drops it when it reads the bad chunk
                continue
            for i in range(0, len(good), WRITE_BATCH):
                batch = []
                for d, offset, length in good[i:i + WRITE_BATCH]:
                    with contextlib.suppress(OSError):
                        data = pack.read(offset, length)
                        if sha256_digest(data) == d:
                            batch.append((d, data))
                removed += len(good[i:i + WRITE_BATCH]) - len(batch)
                self._store(batch)
        return checked, removed

    def _evict(self, limit: int | None = None) -> None:
        if limit is None:
            if not self.max_bytes:
                return
            limit = self.max_bytes
        while True:
            with self._lock:
                if self._disk_bytes <= limit:
                    return
                victim = next((p for p in self._packs.values() if not p.foreign), None)
            if victim is None:
                return
            self.evicted += self._drop(victim)

    def _remember(self, digest: str, data: bytes) -> None:
        if len(data) <= self._mem.maxsize:
            with self._lock:
                self._mem[digest] = data
