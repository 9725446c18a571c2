"""Small numbers for image references and layer names that stay the same across restarts.

The kernel keeps the node ids the store hands out for as long as it caches
their entries (an hour) and files are open; a store that takes over a live
FUSE connection after a crash or an upgrade must answer for ids it never
handed out itself. So ids are not counted in memory: an image reference and
each (reference, layer name) get a number from this table the first time they
are looked up, and keep it for good. A layer's number is also the high half of
its inode numbers (als/store/build.py), so ``stat`` gives the same answers after
a restart too.

The table is one append-only file of records, each a line with its own
checksum. A record is written (``write(2)``, no fsync) before the id it names
is handed to the kernel: a killed process loses nothing the page cache holds,
and a machine that crashes loses the FUSE connection with it. A torn last
record (a crash mid-write) fails its checksum and is cut off on open; every
record before it stays usable.

A full disk must not stop lookups, so the file keeps space reserved beyond
its end (``fallocate`` with ``FALLOC_FL_KEEP_SIZE``, in steps of
``RESERVE`` bytes, a few hundred records each): records land in space
already allocated, and the reserve is topped up while the disk has room.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
import zlib
from pathlib import Path

log = logging.getLogger("als.state")

IMAGE, LAYER = "image", "layer"
MAX_ID = (1 << 31) - 1  # an id is the high half of 64-bit node ids and inode numbers
RESERVE = 64 << 10  # bytes kept allocated past the end of the table
FALLOC_FL_KEEP_SIZE = 1

_libc = ctypes.CDLL(None, use_errno=True)


class IdTable:
    """Persistent ``(kind, ref, name) -> id`` (ids from 1), and back."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._ids: dict[tuple[str, str, str], int] = {}
        self._names: dict[int, tuple[str, str, str]] = {}
        good = self._load()
        self._last = max(self._names, default=0)
        # O_APPEND: every record lands after the last one whatever else holds the file
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        if os.fstat(self._fd).st_size > good:
            log.warning("%s: dropping a torn record at its end (left by a crash)", self.path)
            os.ftruncate(self._fd, good)
        self._size = good
        self._reserved = good  # the file is allocated up to here
        self._reserve()

    def _reserve(self) -> None:
        """Top the reserve up to RESERVE bytes past the end when less than half is left; quietly
        not when the disk is full (what is left of it still serves)."""
        if self._reserved - self._size >= RESERVE // 2:
            return
        if _libc.fallocate(self._fd, FALLOC_FL_KEEP_SIZE, ctypes.c_long(self._size),
                           ctypes.c_long(RESERVE)) == 0:
            self._reserved = self._size + RESERVE
        elif self._reserved <= self._size:
            log.warning("%s: no space could be reserved for new ids (%s): a full disk will refuse new "
                        "images and layers", self.path, os.strerror(ctypes.get_errno()))

    def _load(self) -> int:
        """Read every whole, checked record; the length of the file they fill."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        pos = 0
        while True:
            end = data.find(b"\n", pos)
            if end < 0:
                return pos
            record = _parse(data[pos:end])
            if record is None:
                return pos
            ident, key = record
            self._ids[key] = ident
            self._names[ident] = key
            pos = end + 1

    def image(self, ref: str) -> int:
        """The id of image reference ``ref``, assigned (and saved) on first use."""
        return self._id((IMAGE, ref, ""))

    def layer(self, ref: str, name: str) -> int:
        """The id of layer ``name`` (a blob or TOC digest) of image ``ref``, assigned on first use."""
        return self._id((LAYER, ref, name))

    def find(self, kind: str, ref: str, name: str = "") -> int | None:
        """The id already assigned, without assigning one."""
        return self._ids.get((kind, ref, name))

    def name(self, ident: int) -> tuple[str, str, str] | None:
        """``(kind, ref, name)`` of ``ident``, or None if it was never assigned."""
        return self._names.get(ident)

    def _id(self, key: tuple[str, str, str]) -> int:
        ident = self._ids.get(key)
        if ident is not None:
            return ident
        with self._lock:
            ident = self._ids.get(key)
            if ident is not None:
                return ident
            ident = self._last + 1
            if ident > MAX_ID:
                raise OSError(f"{self.path}: no ids left")
            line = _record(ident, key)
            try:
                written = os.write(self._fd, line)
            except OSError:
                written = -1
            if written != len(line):  # a full disk without a reserve: nothing is handed out
                os.ftruncate(self._fd, self._size)  # no torn record for later ones to follow
                raise OSError(f"{self.path}: could not save the id of {key[0]} {key[1]} {key[2]}".rstrip())
            self._size += written
            self._reserve()
            self._names[ident] = key
            self._ids[key] = ident
            self._last = ident
            return ident

    def close(self) -> None:
        os.close(self._fd)


def _record(ident: int, key: tuple[str, str, str]) -> bytes:
    body = json.dumps([ident, *key], separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _parse(line: bytes) -> tuple[int, tuple[str, str, str]] | None:
    crc, _, body = line.partition(b" ")
    try:
        if int(crc, 16) != zlib.crc32(body):
            return None
        ident, kind, ref, name = json.loads(body)
    except ValueError:
        return None
    if not isinstance(ident, int) or not 0 < ident <= MAX_ID or kind not in (IMAGE, LAYER):
        return None
    return ident, (kind, str(ref), str(name))
