"""The chunk cache: verified, uncompressed chunks keyed by their digest.

Keying by content digest means identical chunks in different layers and images
are stored once, and an entry can always be checked: every disk read is hashed
again, so a torn write, a bit flip or a file planted in the cache directory is
dropped and refetched instead of being served. Writes go to a temporary file
that is renamed into place, so a crash never leaves a half chunk under its
final name. A small in-memory tier serves the many small FUSE reads that land
in one chunk without re-reading and re-hashing it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

from cachetools import LRUCache

from als.digest import hex_of, sha256_digest

log = logging.getLogger("als.cache")


def atomic_write(path: Path, data: bytes, tmp_dir: Path) -> bool:
    """Write ``data`` under a temporary name and rename it into place.

    A crash leaves either nothing or the whole file under ``path``, never a
    prefix of it. Failures (a full disk, a read-only directory) are logged and
    reported as False: callers keep serving from memory.
    """
    tmp = tmp_dir / f".{path.name}.{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return True
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.warning("cannot store %s: %s", path, e)
        return False


class ChunkCache:
    def __init__(self, root: Path, memory_bytes: int = 32 << 20):
        self.dir = Path(root) / "chunks" / "sha256"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._tmp = Path(root) / "chunks" / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in self._tmp.iterdir():  # left by a crash mid-write
            stale.unlink(missing_ok=True)
        self._mem: LRUCache = LRUCache(maxsize=max(memory_bytes, 1), getsizeof=len)
        self._lock = threading.Lock()
        self.hits = self.misses = self.corrupt = 0

    def path(self, digest: str) -> Path:
        h = hex_of(digest)
        return self.dir / h[:2] / h

    def get(self, digest: str) -> bytes | None:
        """The verified chunk, or None if it is not cached (or was corrupt)."""
        with self._lock:
            data = self._mem.get(digest)
        if data is not None:
            self.hits += 1
            return data
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError as e:
            log.warning("chunk cache: cannot read %s: %s", digest, e)
            self.misses += 1
            return None
        if sha256_digest(data) != digest:
            self.corrupt += 1
            log.warning("chunk cache: entry %s does not match its digest; dropping it", digest)
            path.unlink(missing_ok=True)
            return None
        self.hits += 1
        self._remember(digest, data)
        return data

    def put(self, digest: str, data: bytes) -> None:
        """Store a chunk the caller has verified. A full disk is logged, not fatal."""
        self._remember(digest, data)
        path = self.path(digest)
        if path.exists():
            return
        with contextlib.suppress(OSError):
            path.parent.mkdir(exist_ok=True, mode=0o700)
        atomic_write(path, data, self._tmp)

    def _remember(self, digest: str, data: bytes) -> None:
        if len(data) <= self._mem.maxsize:
            with self._lock:
                self._mem[digest] = data
