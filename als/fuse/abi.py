"""The FUSE kernel ABI as <linux/fuse.h> (protocol 7.31) defines it: opcodes, flags, structures, packing.

Kept apart from the session so that every byte layout the kernel depends on
sits in one place to check against the header, with nothing about threads or
files around it. Names follow the header's, without its ``FUSE_`` prefix.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

MINOR = 31  # the protocol version spoken (every feature asked for is older)
MIN_MINOR = 28  # the oldest accepted: max_pages and cached symlinks (Linux 4.20)

# opcodes
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS, RELEASE = 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18
SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 21, 22, 23, 24, 25, 26, 27, 28, 29
ACCESS, CREATE, INTERRUPT, DESTROY, BATCH_FORGET, READDIRPLUS = 34, 35, 36, 38, 42, 44

OP_NAMES = {LOOKUP: "lookup", GETATTR: "getattr", SETATTR: "setattr", READLINK: "readlink", SYMLINK: "symlink",
            MKNOD: "mknod", MKDIR: "mkdir", UNLINK: "unlink", RMDIR: "rmdir", RENAME: "rename", LINK: "link",
            OPEN: "open", READ: "read", WRITE: "write", STATFS: "statfs", RELEASE: "release",
            SETXATTR: "setxattr", GETXATTR: "getxattr", LISTXATTR: "listxattr", REMOVEXATTR: "removexattr",
            FLUSH: "flush", OPENDIR: "opendir", READDIR: "readdir", RELEASEDIR: "releasedir", ACCESS: "access",
            CREATE: "create", READDIRPLUS: "readdirplus"}

# INIT flags
ASYNC_READ, DO_READDIRPLUS, READDIRPLUS_AUTO = 1 << 0, 1 << 13, 1 << 14
NO_OPEN_SUPPORT, PARALLEL_DIROPS, MAX_PAGES, CACHE_SYMLINKS, NO_OPENDIR_SUPPORT = 1 << 17, 1 << 18, 1 << 22, 1 << 23, 1 << 24
WANTED = ASYNC_READ | DO_READDIRPLUS | READDIRPLUS_AUTO | PARALLEL_DIROPS | MAX_PAGES | CACHE_SYMLINKS
FOPEN_KEEP_CACHE, FOPEN_CACHE_DIR = 1 << 1, 1 << 3
NOTIFY_INVAL_INODE, NOTIFY_INVAL_ENTRY = 2, 3
# Keeping a connection across a restart of the daemon (protocol 7.40, Linux 6.9): the kernel offers
# HAS_RESEND in the high half of its flags (flags2, sent when INIT_EXT is set); the NOTIFY_RESEND
# notification puts every request read but not answered back in the queue, its unique id marked
# with UNIQUE_RESEND.
INIT_EXT, HAS_RESEND = 1 << 30, 1 << 39
NOTIFY_RESEND = 7
UNIQUE_RESEND = 1 << 63

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")  # times are signed
ENTRY_HEAD = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, their nanoseconds
ENTRY_SIZE = ENTRY_HEAD.size + ATTR.size  # fuse_entry_out
ATTR_HEAD = struct.Struct("<QII")
INIT_IN = struct.Struct("<IIII")
INIT_IN_FLAGS2 = struct.Struct("<I")  # after INIT_IN, when flags has INIT_EXT
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
READ_IN = struct.Struct("<QQI")
OPEN_OUT = struct.Struct("<QII")
SIZE_IN = struct.Struct("<II")  # getxattr_in / listxattr_in, getxattr_out
FORGET_IN = struct.Struct("<Q")
FORGET_ONE = struct.Struct("<QQ")
INVAL_INODE = struct.Struct("<Qqq")  # nodeid, offset, length
INVAL_ENTRY = struct.Struct("<QII")  # parent, namelen, flags
DIRENT = struct.Struct("<QQII")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")

MAX_WRITE = 4096  # the least the kernel takes: nothing is writable, and each worker's buffer must hold one
MAX_PAGES_COUNT = 256  # 1 MiB reads: a whole chunk per request
MAX_BACKGROUND, CONGESTION_THRESHOLD = 64, 48  # asynchronous requests the kernel keeps in flight


class FuseError(OSError):
    """Raised by operations to answer with an errno."""

    def __init__(self, err: int):
        super().__init__(err, os.strerror(err))


@dataclass(slots=True)
class Attr:
    """What the kernel caches for an inode: ``stat`` fields plus how long they stay valid.

    Times are signed (before 1970 is negative) with their nanoseconds, as the kernel's ABI has them.
    """

    ino: int
    mode: int
    size: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    mtime: int = 0
    mtime_nsec: int = 0

    def pack(self) -> bytes:
        t, ns = self.mtime, self.mtime_nsec
        return ATTR.pack(self.ino, self.size, (self.size + 511) >> 9, t, t, t, ns, ns, ns, self.mode, self.nlink,
                         self.uid, self.gid, self.rdev, 4096, 0)


@dataclass(slots=True)
class Entry:
    """A looked-up name: the kernel counts one reference to ``nodeid`` for every entry sent."""

    nodeid: int
    attr: Attr
    entry_timeout: float
    attr_timeout: float

    @classmethod
    def missing(cls, timeout: float) -> "Entry":
        """Node id 0: the kernel remembers for ``timeout`` that the name does not exist."""
        return cls(0, Attr(0, 0), timeout, 0.0)

    def pack(self) -> bytes:
        ev, et = split_seconds(self.entry_timeout)
        av, at = split_seconds(self.attr_timeout)
        return ENTRY_HEAD.pack(self.nodeid, 0, ev, av, et, at) + self.attr.pack()


def split_seconds(t: float) -> tuple[int, int]:
    """A timeout as the kernel takes it: whole seconds and nanoseconds."""
    s = int(t)
    return s, int((t - s) * 1e9)


def init_reply(max_readahead: int, kernel_flags: int) -> bytes:
    """fuse_init_out: the features wanted that the kernel offers, and 1 MiB reads."""
    return INIT_OUT.pack(7, MINOR, max_readahead, kernel_flags & WANTED, MAX_BACKGROUND, CONGESTION_THRESHOLD,
                         MAX_WRITE, 1, MAX_PAGES_COUNT, 0, 0, 0)


def init_flags(body: bytes) -> int:
    """All 64 bits of the kernel's INIT flags: flags2 is the high half, present with INIT_EXT."""
    flags = INIT_IN.unpack_from(body)[3]
    if flags & INIT_EXT and len(body) >= INIT_IN.size + INIT_IN_FLAGS2.size:
        flags |= INIT_IN_FLAGS2.unpack_from(body, INIT_IN.size)[0] << 32
    return flags


def attr_reply(attr: Attr, timeout: float) -> bytes:
    """fuse_attr_out."""
    s, ns = split_seconds(timeout)
    return ATTR_HEAD.pack(s, ns, 0) + attr.pack()


OPEN_REPLY = OPEN_OUT.pack(0, FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR, 0)  # content never changes: keep pages
STATFS_REPLY = STATFS_OUT.pack(0, 0, 0, 0, 0, 4096, 255, 4096, 0)


def dirent(ino: int, next_offset: int, name: bytes, mode: int) -> bytes:
    """One fuse_dirent, padded to 8 bytes; ``next_offset`` is where the next listing reply starts."""
    rec = DIRENT.pack(ino, next_offset, len(name), (mode >> 12) & 0o17) + name
    return rec + bytes(-len(rec) % 8)


def xattr_reply(value: bytes, size: int) -> bytes:
    """The xattr answer convention: size 0 asks for the length, a short buffer is ERANGE."""
    if size == 0:
        return SIZE_IN.pack(len(value), 0)
    if size < len(value):
        raise FuseError(errno.ERANGE)
    return value


def reply_header(length: int, err: int, unique: int) -> bytes:
    """fuse_out_header of the reply to request ``unique``: ``err`` is an errno, sent negated."""
    return OUT_HEADER.pack(OUT_HEADER.size + length, -err, unique)


def notify_header(length: int, code: int) -> bytes:
    """fuse_out_header of a notification: unique 0, the notification's code where a reply has its error."""
    return OUT_HEADER.pack(OUT_HEADER.size + length, code, 0)


def inval_inode(nodeid: int) -> bytes:
    """fuse_notify_inval_inode_out for everything cached of ``nodeid``: offset 0, length 0 is every page."""
    return INVAL_INODE.pack(nodeid, 0, 0)


def inval_entry(parent: int, name: bytes) -> bytes:
    """fuse_notify_inval_entry_out and the name it drops."""
    return INVAL_ENTRY.pack(parent, len(name), 0) + name + b"\0"
