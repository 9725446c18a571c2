"""The FUSE kernel protocol, spoken directly over /dev/fuse: mount, request loop, replies.

Why not libfuse: its high-level API (fuse-python) answers every open, close,
directory listing and symlink with a round trip into Python, which made warm
reads through the store four times slower than from a normal layer. Spoken
directly, the protocol lets the store tell the kernel what immutable content
allows: no open or opendir messages at all (the kernel keeps pages and listings
across opens), cached symlinks, listings with attributes (readdirplus), timeouts
per entry, names and xattr values as bytes, and a fixed pool of worker threads.

This module knows nothing about layers: it calls an ``Operations`` object by
node id (see als/fusefs.py) and packs what it returns. Structures and opcodes
are those of <linux/fuse.h>, protocol 7.31.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import socket
import stat
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

log = logging.getLogger("als.fuse")

MINOR = 31  # the protocol version this module speaks (every feature it asks for is older)

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
NOTIFY_INVAL_INODE = 2

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_HEAD = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, their nanoseconds
ENTRY_SIZE = ENTRY_HEAD.size + ATTR.size  # fuse_entry_out
ATTR_HEAD = struct.Struct("<QII")
INIT_IN = struct.Struct("<IIII")
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
READ_IN = struct.Struct("<QQI")
OPEN_OUT = struct.Struct("<QII")
SIZE_IN = struct.Struct("<II")  # getxattr_in / listxattr_in, getxattr_out
FORGET_IN = struct.Struct("<Q")
FORGET_ONE = struct.Struct("<QQ")
INVAL_INODE = struct.Struct("<Qqq")  # nodeid, offset, length
DIRENT = struct.Struct("<QQII")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")

MAX_WRITE = 4096  # the least the kernel takes: nothing is writable, and each worker's buffer must hold one
MAX_PAGES_COUNT = 256  # 1 MiB reads: a whole chunk per request
BUFFER = 16 << 10  # a request: header, arguments and up to two names (PATH_MAX for a symlink target)
MS_RDONLY, MNT_DETACH = 1, 2


class FuseError(OSError):
    """Raised by operations to answer with an errno."""

    def __init__(self, err: int):
        super().__init__(err, os.strerror(err))


@dataclass(slots=True)
class Attr:
    """What the kernel caches for an inode: ``stat`` fields plus how long they stay valid."""

    ino: int
    mode: int
    size: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    mtime: int = 0

    def pack(self) -> bytes:
        t = self.mtime
        return ATTR.pack(self.ino, self.size, (self.size + 511) >> 9, t, t, t, 0, 0, 0, self.mode, self.nlink,
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
        ev, et = _split_seconds(self.entry_timeout)
        av, at = _split_seconds(self.attr_timeout)
        return ENTRY_HEAD.pack(self.nodeid, 0, ev, av, et, at) + self.attr.pack()


def _split_seconds(t: float) -> tuple[int, int]:
    s = int(t)
    return s, int((t - s) * 1e9)


class Operations(Protocol):
    """What a file system answers, by node id (1 is the root); errors are raised as OSError."""

    def lookup(self, parent: int, name: bytes) -> Entry: ...
    def forget(self, nodeid: int, count: int) -> None: ...
    def getattr(self, nodeid: int) -> tuple[Attr, float]: ...
    def readlink(self, nodeid: int) -> bytes: ...
    def read(self, nodeid: int, offset: int, size: int) -> bytes: ...
    def listing(self, nodeid: int) -> list[tuple[bytes, int, int]]: ...  # (name, ino, mode)
    def getxattr(self, nodeid: int, name: bytes) -> bytes: ...
    def listxattr(self, nodeid: int) -> list[bytes]: ...
    def create(self, parent: int, name: bytes) -> None: ...
    def rmdir(self, parent: int, name: bytes) -> None: ...
    def error(self, op: str, nodeid: int, exc: Exception) -> int: ...


class Session:
    """One mounted FUSE connection served by a fixed pool of threads.

    Every worker reads requests from the same /dev/fuse descriptor (the kernel
    hands each request to one reader) and writes its answer back. A read that
    waits for the network holds one worker; the others keep answering.
    """

    def __init__(self, fd: int, ops: Operations, *, workers: int = 16,
                 observe: Callable[[str, int], None] | None = None):
        self.fd, self.ops, self.workers = fd, ops, max(1, workers)
        self.observe = observe
        self.initialized = threading.Event()  # the kernel's INIT has been answered: the mount is live
        self.no_open = False  # the kernel takes ENOSYS from OPEN/OPENDIR as "open needs no message"
        self.finished = threading.Event()
        self._stale: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._handlers = {
            LOOKUP: self._lookup, GETATTR: self._getattr, READLINK: self._readlink, OPEN: self._open,
            OPENDIR: self._open, READ: self._read, READDIR: self._readdir, READDIRPLUS: self._readdirplus,
            GETXATTR: self._getxattr, LISTXATTR: self._listxattr, STATFS: self._statfs, CREATE: self._create,
            MKNOD: self._create, RMDIR: self._rmdir, ACCESS: self._empty, RELEASE: self._empty,
            RELEASEDIR: self._empty, DESTROY: self._empty, INIT: self._init,
        }
        # FLUSH is left unanswered (ENOSYS): the kernel then stops sending it on every close.
        for op in (SETATTR, SYMLINK, MKDIR, UNLINK, RENAME, LINK, WRITE, SETXATTR, REMOVEXATTR):
            self._handlers[op] = self._read_only

    def start(self) -> "Session":
        for i in range(self.workers):
            threading.Thread(target=self._serve, name=f"fuse-{i}", daemon=True).start()
        threading.Thread(target=self._notify, name="fuse-notify", daemon=True).start()
        return self

    def invalidate(self, nodeid: int) -> None:
        """Make the kernel drop what it caches of ``nodeid`` (attributes, pages, listing).

        Sent from a thread of its own: the kernel may need locks that the request
        which caused the change still holds.
        """
        self._stale.put(nodeid)

    def _notify(self) -> None:
        while not self.finished.is_set():
            try:
                nodeid = self._stale.get(timeout=1.0)
            except queue.Empty:
                continue
            msg = INVAL_INODE.pack(nodeid, 0, 0)  # offset 0, length 0: every page, the listing included
            try:
                os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size + len(msg), NOTIFY_INVAL_INODE, 0) + msg)
            except OSError as e:
                if e.errno == errno.ENODEV:
                    return
                if e.errno != errno.ENOENT:  # ENOENT: the kernel holds nothing for it
                    log.warning("telling the kernel to refresh node %d failed: %s", nodeid, e)

    # ---- the request loop ----------------------------------------------------------------
    def _serve(self) -> None:
        buf = bytearray(BUFFER)
        view = memoryview(buf)
        fd = self.fd
        while True:
            try:
                n = os.readv(fd, [buf])
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):  # ENOENT: an interrupted request
                    continue
                if e.errno != errno.ENODEV:  # ENODEV: unmounted
                    log.error("reading /dev/fuse failed: %s", e)
                break
            _, opcode, unique, nodeid = IN_HEADER.unpack_from(buf)[:4]
            if opcode == FORGET:
                self.ops.forget(nodeid, FORGET_IN.unpack_from(buf, IN_HEADER.size)[0])
                continue
            if opcode == BATCH_FORGET:
                self._batch_forget(view[IN_HEADER.size:n])
                continue
            if opcode == INTERRUPT:  # reads are bounded by their own timeouts: nothing to cancel
                continue
            self._answer(opcode, unique, nodeid, bytes(view[IN_HEADER.size:n]))
        self.finished.set()

    def _answer(self, opcode: int, unique: int, nodeid: int, body: bytes) -> None:
        handler = self._handlers.get(opcode)
        err = 0
        reply: bytes | list[bytes] = b""
        if handler is None:
            err = errno.ENOSYS
        else:
            try:
                reply = handler(nodeid, body)
            except FuseError as e:
                err = e.errno
            except Exception as e:  # every failure is an errno for the kernel, never a dead worker
                err = self.ops.error(OP_NAMES.get(opcode, str(opcode)), nodeid, e)
        if self.observe is not None and opcode != INIT:
            self.observe(OP_NAMES.get(opcode, str(opcode)), err)
        parts = reply if type(reply) is list else [reply]
        size = OUT_HEADER.size + (0 if err else sum(len(p) for p in parts))
        try:
            os.writev(self.fd, [OUT_HEADER.pack(size, -err, unique)] + ([] if err else parts))
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV):  # ENOENT: the request was interrupted
                log.error("answering the kernel failed: %s", e)

    def _batch_forget(self, body: memoryview) -> None:
        count = struct.unpack_from("<I", body)[0]
        for i in range(count):
            nodeid, n = FORGET_ONE.unpack_from(body, 8 + i * FORGET_ONE.size)
            self.ops.forget(nodeid, n)

    # ---- operations ----------------------------------------------------------------------
    def _init(self, nodeid: int, body: bytes) -> bytes:
        major, minor, max_readahead, flags = INIT_IN.unpack_from(body)
        if major != 7:
            raise FuseError(errno.EPROTO)
        self.no_open = bool(flags & NO_OPEN_SUPPORT) and bool(flags & NO_OPENDIR_SUPPORT)
        reply = INIT_OUT.pack(7, MINOR, max_readahead, flags & WANTED, 64, 48, MAX_WRITE, 1, MAX_PAGES_COUNT,
                              0, 0, 0)
        log.debug("FUSE connection: kernel protocol 7.%d, flags %#x, zero-message opens %s", minor, flags,
                  "on" if self.no_open else "off")
        self.initialized.set()
        return reply

    def _lookup(self, nodeid: int, body: bytes) -> bytes:
        return self.ops.lookup(nodeid, body[:-1]).pack()

    def _getattr(self, nodeid: int, body: bytes) -> bytes:
        attr, timeout = self.ops.getattr(nodeid)
        s, ns = _split_seconds(timeout)
        return ATTR_HEAD.pack(s, ns, 0) + attr.pack()

    def _readlink(self, nodeid: int, body: bytes) -> bytes:
        return self.ops.readlink(nodeid)

    def _open(self, nodeid: int, body: bytes) -> bytes:
        flags = struct.unpack_from("<I", body)[0]
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FuseError(errno.EROFS)
        if self.no_open:  # from now on the kernel opens with no message, keeping pages and listings
            raise FuseError(errno.ENOSYS)
        return OPEN_OUT.pack(0, FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR, 0)

    def _read(self, nodeid: int, body: bytes) -> bytes:
        _, offset, size = READ_IN.unpack_from(body)
        return self.ops.read(nodeid, offset, size)

    def _readdir(self, nodeid: int, body: bytes) -> list[bytes]:
        return self._listing(nodeid, body, plus=False)

    def _readdirplus(self, nodeid: int, body: bytes) -> list[bytes]:
        return self._listing(nodeid, body, plus=True)

    def _listing(self, nodeid: int, body: bytes, plus: bool) -> list[bytes]:
        """Directory entries from ``offset`` that fit in ``size``; with ``plus``, each looked up too."""
        _, offset, size = READ_IN.unpack_from(body)
        out, used = [], 0
        entries = self.ops.listing(nodeid)
        for i in range(offset, len(entries)):
            name, ino, mode = entries[i]
            rec = DIRENT.pack(ino, i + 1, len(name), (mode >> 12) & 0o17) + name
            rec += bytes(-len(rec) % 8)
            if used + len(rec) + (ENTRY_SIZE if plus else 0) > size:
                break  # looked up only once it fits: the kernel counts a reference per entry sent
            if plus:  # the kernel takes no reference for "." and ".."
                rec = (bytes(ENTRY_SIZE) if name in (b".", b"..") else self.ops.lookup(nodeid, name).pack()) + rec
            out.append(rec)
            used += len(rec)
        return out

    def _getxattr(self, nodeid: int, body: bytes) -> bytes:
        size = SIZE_IN.unpack_from(body)[0]
        value = self.ops.getxattr(nodeid, body[SIZE_IN.size:-1])
        return _sized(value, size)

    def _listxattr(self, nodeid: int, body: bytes) -> bytes:
        size = SIZE_IN.unpack_from(body)[0]
        return _sized(b"".join(n + b"\0" for n in self.ops.listxattr(nodeid)), size)

    def _statfs(self, nodeid: int, body: bytes) -> bytes:
        return STATFS_OUT.pack(0, 0, 0, 0, 0, 4096, 255, 4096, 0)

    def _create(self, nodeid: int, body: bytes) -> bytes:
        self.ops.create(nodeid, body[16:].split(b"\0", 1)[0])  # after create_in / mknod_in
        raise FuseError(errno.EROFS)

    def _rmdir(self, nodeid: int, body: bytes) -> bytes:
        self.ops.rmdir(nodeid, body[:-1])
        raise FuseError(errno.EROFS)

    def _empty(self, nodeid: int, body: bytes) -> bytes:
        return b""

    def _read_only(self, nodeid: int, body: bytes) -> bytes:
        raise FuseError(errno.EROFS)


def _sized(value: bytes, size: int) -> bytes:
    """The xattr answer convention: size 0 asks for the length, a short buffer is ERANGE."""
    if size == 0:
        return SIZE_IN.pack(len(value), 0)
    if size < len(value):
        raise FuseError(errno.ERANGE)
    return value


# ---- mounting --------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


def mount(mountpoint: Path, read_only: bool = False, allow_other: bool = True) -> int:
    """Mount an empty FUSE file system at ``mountpoint``; returns the /dev/fuse descriptor to serve.

    mount(2) works as root and inside a user namespace that owns its mount
    namespace (`podman unshare`); elsewhere fusermount3 mounts and passes back
    the descriptor, as libfuse does. ``read_only`` also spares a round trip:
    the kernel marks a file's access time stale after reading it from the
    daemon, and asks for it again on the next stat, unless the mount is
    read-only.
    """
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = ["default_permissions", f"max_read={MAX_PAGES_COUNT * 4096}"] + (["allow_other"] if allow_other else [])
    data = ",".join([f"fd={fd}", f"rootmode={stat.S_IFDIR:o}", f"user_id={os.getuid()}",
                     f"group_id={os.getgid()}"] + opts)
    flags = MS_RDONLY if read_only else 0
    if _libc.mount(b"als", os.fsencode(mountpoint), b"fuse.als", flags, data.encode()) == 0:
        return fd
    err = ctypes.get_errno()
    os.close(fd)
    if err not in (errno.EPERM, errno.EACCES):
        raise OSError(err, f"mounting FUSE on {mountpoint}: {os.strerror(err)}")
    return _fusermount(mountpoint, ["fsname=als", "subtype=als"] + (["ro"] if read_only else []) + opts)


def _fusermount(mountpoint: Path, opts: list[str]) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        try:
            r = subprocess.run(["fusermount3", "-o", ",".join(opts), "--", str(mountpoint)], env=env,
                               pass_fds=(theirs.fileno(),), capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise OSError(errno.EPERM, f"mounting FUSE on {mountpoint} with fusermount3: {e}") from None
        if r.returncode != 0:
            raise OSError(errno.EPERM, f"fusermount3 could not mount {mountpoint}: {r.stderr.strip()}")
        theirs.close()
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise OSError(errno.EPERM, f"fusermount3 mounted {mountpoint} but passed no descriptor")
    return fds[0]


def unmount(mountpoint: Path) -> None:
    """Detach the mount: in-flight users keep it until they let go, new ones no longer see it."""
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) == 0:
        return
    try:
        subprocess.run(["fusermount3", "-u", "-z", "--", str(mountpoint)], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("unmounting %s failed: %s", mountpoint, e)
