"""Pack files: the chunk cache's disk format, many chunks appended to one file.

A file per chunk cost more than the chunk itself: creating, writing and
renaming a 20 KB file took 0.3-0.5 ms of kernel time on ext4, most of the
store's CPU while a container read a whole image. A pack is instead two
append-only files in the pack directory: ``<n>.pack`` holds chunk bytes back
to back, ``<n>.index`` a header (``MAGIC``) and then one fixed-size record per
chunk: its digest, offset and length, and a CRC-32 of those.

Crash safety rests on the order of writes and on what a reader accepts:

- a chunk's bytes are written, whole, before its record, and a region of the
  pack that a record may name is never written again, so a complete record
  names complete bytes whenever the process dies (the kernel keeps what was
  written: SIGKILL loses nothing that a write returned);
- a record cut short or damaged fails its CRC and ends the index there (what
  follows is lost, never misread); a record naming bytes past the end of the
  pack is dropped;
- what neither catches (a power loss that kept a record but not its bytes, a
  flipped bit on disk, a planted file) the cache catches on read: every chunk
  read from a pack is hashed against its digest before it is served.

The pack being written is locked (``flock`` on its index) as long as its
writer lives, so another process opening the same cache (``als cache``)
reads it but never removes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import struct
import threading
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"als-chunk-pack\x00\x01"  # 16 bytes: format 1; a pack of any other format is removed
RECORD = struct.Struct("<32sQI")  # sha256 digest (raw), offset in the pack, length
CRC = struct.Struct("<I")
RECORD_SIZE = RECORD.size + CRC.size
NAME = re.compile(r"([0-9a-f]{16})\.(pack|index)")
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Record:
    digest: str
    offset: int
    length: int


def encode(record: Record) -> bytes:
    body = RECORD.pack(bytes.fromhex(record.digest[len("sha256:"):]), record.offset, record.length)
    return body + CRC.pack(zlib.crc32(body))


def decode(index: bytes, pack_size: int) -> list[Record]:
    """The records of an index file's bytes: up to the first one cut short or failing its CRC,
    without those that name bytes past ``pack_size``. Raises ValueError for another format."""
    if index[:len(MAGIC)] != MAGIC:
        raise ValueError("not a chunk pack index of this format")
    out = []
    for pos in range(len(MAGIC), len(index) - RECORD_SIZE + 1, RECORD_SIZE):
        body = index[pos:pos + RECORD.size]
        (crc,) = CRC.unpack_from(index, pos + RECORD.size)
        if zlib.crc32(body) != crc:
            break  # torn or damaged: nothing after it can be trusted to be in order
        raw, offset, length = RECORD.unpack(body)
        if offset + length <= pack_size:
            out.append(Record("sha256:" + raw.hex(), offset, length))
    return out


def pack_name(number: int, kind: str) -> str:
    return f"{number:016x}.{kind}"


class Pack:
    """One pack: its files, the bytes its records may name (``size``) and, while it is the
    pack being written, its index's write end, which holds the lock."""

    def __init__(self, directory: Path, number: int, size: int, index_end: int = 0, index_fd: int = -1,
                 data_fd: int = -1):
        self.number = number
        self.data_path = directory / pack_name(number, "pack")
        self.index_path = directory / pack_name(number, "index")
        self.size = size  # bytes of the pack that records may name; never written again
        self.digests: list[str] = []  # the digests the cache serves from this pack
        self.foreign = False  # another live process writes it: read it, never remove it
        self._index_end = index_end
        self._index_fd = index_fd
        self._fd = data_fd
        self._open_lock = threading.Lock()
        # fds are closed when the last reader drops the pack, never under a read in progress
        self._fds = [fd for fd in (data_fd, index_fd) if fd >= 0]
        weakref.finalize(self, _close_all, self._fds)

    @property
    def writable(self) -> bool:
        return self._index_fd >= 0

    @classmethod
    def create(cls, directory: Path, number: int) -> "Pack":
        """A new, empty pack, locked for writing. Raises OSError (a full disk, for one)."""
        index_path = directory / pack_name(number, "index")
        ifd = os.open(index_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
        dfd = -1
        try:
            fcntl.flock(ifd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(ifd, MAGIC, 0)
            dfd = os.open(directory / pack_name(number, "pack"), os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS,
                          0o600)
        except OSError:
            for fd in (ifd, dfd):
                if fd >= 0:
                    os.close(fd)
            with contextlib.suppress(OSError):
                index_path.unlink()
            raise
        return cls(directory, number, 0, len(MAGIC), ifd, dfd)

    @classmethod
    def load(cls, directory: Path, number: int) -> tuple["Pack", list[Record]] | None:
        """An existing pack and its complete records, or None: it was incomplete (no chunk bytes) or of
        another format, and has been removed. Raises OSError."""
        index_path = directory / pack_name(number, "index")
        ifd = os.open(index_path, os.O_RDONLY | _OPEN_FLAGS)
        try:
            foreign = not _try_lock(ifd)
            try:
                pack_size = os.stat(directory / pack_name(number, "pack"), follow_symlinks=False).st_size
                with open(ifd, "rb", closefd=False) as f:
                    records = decode(f.read(), pack_size)
            except (FileNotFoundError, ValueError):
                if foreign:  # its writer is creating it
                    return cls._foreign(directory, number), []
                cls(directory, number, 0).remove()
                return None
        finally:
            os.close(ifd)  # also drops the lock taken to test it
        pack = cls(directory, number, max((r.offset + r.length for r in records), default=0))
        if foreign:
            pack.foreign = True
        elif pack_size > pack.size:  # bytes of a write cut short: no record names them
            with contextlib.suppress(OSError):
                fd = os.open(pack.data_path, os.O_WRONLY | _OPEN_FLAGS)
                try:
                    os.ftruncate(fd, pack.size)
                finally:
                    os.close(fd)
        return pack, records

    @classmethod
    def _foreign(cls, directory: Path, number: int) -> "Pack":
        pack = cls(directory, number, 0)
        pack.foreign = True
        return pack

    def read(self, offset: int, length: int) -> bytes:
        """The bytes at ``offset`` (fewer at the end of a damaged pack). Raises OSError."""
        return os.pread(self._data_fd(), length, offset)

    def append(self, chunks: list[tuple[str, bytes]]) -> list[Record]:
        """Write ``chunks`` (digest, bytes) and then their records; raises OSError, leaving none of them.

        A write cut short is undone (truncated) where it can be, and the
        bytes of a batch whose records could not be written are never used
        again: a record that did reach the disk still names its own bytes.
        """
        if not self.writable:
            raise OSError(errno.EBADF, f"pack {self.number} is not open for writing")
        records, offset = [], self.size
        for digest, data in chunks:
            records.append(Record(digest, offset, len(data)))
            offset += len(data)
        try:
            _write_all(self._fd, [data for _, data in chunks], self.size)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.size)  # no record names these bytes
            raise
        try:
            _write_all(self._index_fd, b"".join(encode(r) for r in records), self._index_end)
        except OSError:
            self.size = offset  # some records may have reached the index: keep their bytes as they are
            with contextlib.suppress(OSError):
                os.ftruncate(self._index_fd, self._index_end)
            raise
        self.size = offset
        self._index_end += len(records) * RECORD_SIZE
        return records

    def seal(self) -> None:
        """No more writes: close the index's write end, which releases the lock."""
        if self._index_fd >= 0:
            fd, self._index_fd = self._index_fd, -1
            self._fds.remove(fd)
            os.close(fd)

    def remove(self) -> None:
        """Delete both files; readers holding the pack still read what it held."""
        self.seal()
        for path in (self.index_path, self.data_path):
            with contextlib.suppress(OSError):
                path.unlink()

    def close(self) -> None:
        """Close the pack's files now (the cache is closing: nothing reads it any more)."""
        self.seal()
        fds, self._fds[:] = list(self._fds), []
        self._fd = -1
        _close_all(fds)

    def last_used(self) -> float:
        """When the pack was last written or read (reads update atime, with relatime at least daily)."""
        try:
            st = os.stat(self.data_path, follow_symlinks=False)
        except OSError:
            return 0.0
        return max(st.st_atime, st.st_mtime)

    def _data_fd(self) -> int:
        if self._fd < 0:
            with self._open_lock:
                if self._fd < 0:
                    fd = os.open(self.data_path, os.O_RDONLY | _OPEN_FLAGS)
                    self._fds.append(fd)
                    self._fd = fd
        return self._fd


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _write_all(fd: int, data: bytes | list[bytes], offset: int) -> None:
    """Write it all at ``offset`` or raise OSError (a short write is a full disk)."""
    buffers = [data] if isinstance(data, bytes) else data
    total = sum(len(b) for b in buffers)
    done = 0
    for start in range(0, len(buffers), 512):  # IOV_MAX is 1024
        part = buffers[start:start + 512]
        want = sum(len(b) for b in part)
        n = os.pwritev(fd, part, offset + done)
        done += n
        if n != want:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (wrote {done} of {total} bytes)")


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
