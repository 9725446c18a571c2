"""A FUSE session over /dev/fuse: reader threads, the waiting pool, dispatch, replies, interrupts, notifications.

Why not libfuse: its high-level API (fuse-python) answers every open, close,
directory listing and symlink with a round trip into Python, which made warm
reads through the store four times slower than from a normal layer. Spoken
directly, the protocol lets the store tell the kernel what immutable content
allows: no open or opendir messages at all (the kernel keeps pages and listings
across opens), cached symlinks, listings with attributes (readdirplus), timeouts
per entry, names and xattr values as bytes, and a fixed pool of worker threads.

This module knows nothing about layers: it calls an ``Operations`` object by
node id (see als/fuse/filesystem.py) and packs what it returns with the byte
layouts of als/fuse/abi.py; als/fuse/mount.py gives it its descriptor.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from als.fuse import abi
from als.fuse.abi import Attr, Entry, FuseError

log = logging.getLogger("als.fuse")

BUFFER = 16 << 10  # a request: header, arguments and up to two names (PATH_MAX for a symlink target)


class WouldBlock(Exception):
    """Raised by an operation asked with ``req.can_wait`` False when answering means waiting.

    The request is then run again on the session's waiting pool, where it may
    wait (for the registry, a resolve) and be interrupted, while the reader
    threads go on answering everything that can be answered at once.
    """


@dataclass(slots=True, eq=False)
class Request:
    """One request from the kernel, as the operations see it."""

    unique: int
    opcode: int
    nodeid: int
    pid: int  # the calling process (0 for the kernel's own requests)
    can_wait: bool = False  # False: raise WouldBlock rather than wait
    interrupted: threading.Event | None = None  # set when the kernel gives up on the request
    refs: list[int] = field(default_factory=list)  # node ids this reply hands the kernel a reference to
    answered: bool = False


class Operations(Protocol):
    """What a file system answers, by node id (1 is the root); errors are raised as OSError.

    ``lookup`` and ``read`` take the request: called with ``req.can_wait``
    False they raise WouldBlock instead of waiting, and when they wait they
    give up once ``req.interrupted`` is set. ``listing`` must be cheap to call
    for every reply (the file system keeps it): a large directory is listed in
    many replies, each from an offset.
    """

    def lookup(self, parent: int, name: bytes, req: Request) -> Entry: ...
    def forget(self, nodeid: int, count: int) -> None: ...
    def getattr(self, nodeid: int) -> tuple[Attr, float]: ...
    def readlink(self, nodeid: int) -> bytes: ...
    def read(self, nodeid: int, offset: int, size: int, req: Request) -> bytes: ...
    def listing(self, nodeid: int) -> Sequence[tuple[bytes, int, int]]: ...  # (name, ino, mode)
    def getxattr(self, nodeid: int, name: bytes) -> bytes: ...
    def listxattr(self, nodeid: int) -> list[bytes]: ...
    def create(self, parent: int, name: bytes) -> None: ...
    def rmdir(self, parent: int, name: bytes) -> None: ...
    def error(self, op: str, nodeid: int, exc: Exception) -> int: ...
    # Optional: ``adopt(nodeid, req)`` is called before every request on a node, to build a node
    # the kernel holds from before a restart (it may raise WouldBlock, FuseError).


class Session:
    """One mounted FUSE connection: reader threads that never wait, and a pool for requests that do.

    Every reader takes requests from the same /dev/fuse descriptor (the kernel
    hands each request to one reader) and answers what it can at once. A
    request that must wait (a read from the registry, a lookup while its image
    resolves) moves to the waiting pool, so a stalled registry never stops the
    readers from answering cached reads, listings and other layers. The kernel
    may interrupt a waiting request (its caller was killed): it is answered
    EINTR at once and its waiting thread gives up. Every request gets exactly
    one reply, whatever fails; a reply the kernel refuses is replaced by an
    error, and node references in a reply that never arrived are dropped.
    """

    def __init__(self, fd: int, ops: Operations, *, workers: int = 16, waiting: int = 64,
                 observe: Callable[[str, int], None] | None = None):
        self.fd, self.ops, self.workers = fd, ops, max(1, workers)
        self.observe = observe
        self.initialized = threading.Event()  # the kernel's INIT has been answered: the mount is live
        self.refused: str | None = None  # why INIT was refused: the mount is unusable
        self.no_open = False  # the kernel takes ENOSYS from OPEN/OPENDIR as "open needs no message"
        # what INIT settled, as a successor taking the connection over needs it (it gets no INIT)
        self.negotiated: dict[str, int] = {}
        self.finished = threading.Event()
        self._stale: queue.SimpleQueue[tuple[int, bytes]] = queue.SimpleQueue()  # (notification, message)
        self._lock = threading.Lock()
        self._waiting: dict[int, Request] = {}  # unique -> request on the waiting pool
        self._pool = ThreadPoolExecutor(max_workers=max(1, waiting), thread_name_prefix="fuse-wait")
        self._readers = 0
        self._adopt = getattr(ops, "adopt", None)
        self._handlers = {
            abi.LOOKUP: self._lookup, abi.GETATTR: self._getattr, abi.READLINK: self._readlink,
            abi.OPEN: self._open, abi.OPENDIR: self._open, abi.READ: self._read, abi.READDIR: self._readdir,
            abi.READDIRPLUS: self._readdirplus, abi.GETXATTR: self._getxattr, abi.LISTXATTR: self._listxattr,
            abi.STATFS: self._statfs, abi.CREATE: self._create, abi.MKNOD: self._create, abi.RMDIR: self._rmdir,
            abi.ACCESS: self._empty, abi.RELEASE: self._empty, abi.RELEASEDIR: self._empty,
            abi.DESTROY: self._empty, abi.INIT: self._init,
        }
        # FLUSH is left unanswered (ENOSYS): the kernel then stops sending it on every close.
        for op in (abi.SETATTR, abi.SYMLINK, abi.MKDIR, abi.UNLINK, abi.RENAME, abi.LINK, abi.WRITE,
                   abi.SETXATTR, abi.REMOVEXATTR):
            self._handlers[op] = self._read_only

    def start(self) -> "Session":
        self._readers = self.workers
        for i in range(self.workers):
            threading.Thread(target=self._serve, name=f"fuse-{i}", daemon=True).start()
        threading.Thread(target=self._notify, name="fuse-notify", daemon=True).start()
        return self

    @property
    def can_resend(self) -> bool:
        """Whether the kernel can hand this connection's unanswered requests to a successor."""
        return bool(self.negotiated.get("kernel_flags", 0) & abi.HAS_RESEND)

    def resume(self, negotiated: dict[str, int]) -> int:
        """Take over a live connection from a store that stopped or died: no INIT comes.

        ``negotiated`` is what its INIT settled. Once the readers run, the
        kernel is asked to queue again every request the previous daemon had
        read but not answered (FUSE_NOTIFY_RESEND); each gets its one answer
        here. Returns 0, or the errno of a kernel that cannot re-send.
        """
        self.negotiated = dict(negotiated)
        self.no_open = bool(negotiated.get("no_open"))
        self.initialized.set()
        self.start()
        try:
            os.write(self.fd, abi.notify_header(0, abi.NOTIFY_RESEND))
        except OSError as e:
            return e.errno or errno.EIO
        return 0

    def invalidate(self, nodeid: int) -> None:
        """Make the kernel drop what it caches of ``nodeid`` (attributes, pages, listing).

        Sent from a thread of its own: the kernel may need locks that the request
        which caused the change still holds.
        """
        self._stale.put((abi.NOTIFY_INVAL_INODE, abi.inval_inode(nodeid)))  # the listing included

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Make the kernel drop the name ``name`` in ``parent``; what it named is forgotten once unused."""
        self._stale.put((abi.NOTIFY_INVAL_ENTRY, abi.inval_entry(parent, name)))

    def _notify(self) -> None:
        while not self.finished.is_set():
            try:
                code, msg = self._stale.get(timeout=1.0)
            except queue.Empty:
                continue
            try:
                os.write(self.fd, abi.notify_header(len(msg), code) + msg)
            except OSError as e:
                if e.errno == errno.ENODEV:
                    return
                if e.errno != errno.ENOENT:  # ENOENT: the kernel holds nothing for it
                    log.warning("telling the kernel to refresh node %d failed: %s", struct.unpack_from("<Q", msg)[0], e)

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
            if n == 0:  # /dev/fuse never reads empty; a socket standing in for it (tests) was closed
                break
            try:
                self._take(view, n)
            except Exception:  # a bug here must not cost a reader: _take answers what it can
                log.exception("handling a FUSE request failed")
        with self._lock:
            self._readers -= 1
            last = self._readers == 0
        if last:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.finished.set()

    def _take(self, view: memoryview, n: int) -> None:
        _, opcode, unique, nodeid, _, _, pid = abi.IN_HEADER.unpack_from(view)[:7]
        if opcode == abi.FORGET:
            self.ops.forget(nodeid, abi.FORGET_IN.unpack_from(view, abi.IN_HEADER.size)[0])
        elif opcode == abi.BATCH_FORGET:
            self._batch_forget(view[abi.IN_HEADER.size:n])
        elif opcode == abi.INTERRUPT:
            self._interrupt(unique, abi.FORGET_IN.unpack_from(view, abi.IN_HEADER.size)[0])
        else:
            req = Request(unique, opcode, nodeid, pid)
            try:
                self._run(req, bytes(view[abi.IN_HEADER.size:n]))
            except BaseException:
                self._finish(req, errno.EIO, b"")  # whatever failed, the caller must not hang
                raise

    def _run(self, req: Request, body: bytes) -> None:
        """Answer ``req``, or hand it to the waiting pool if answering means waiting."""
        handler = self._handlers.get(req.opcode)
        err, reply = 0, b""
        if handler is None:
            err = errno.ENOSYS
        else:
            try:
                if self._adopt is not None and req.nodeid:
                    self._adopt(req.nodeid, req)
                reply = handler(req, body)
            except WouldBlock:
                self._release(req)
                if not req.can_wait:
                    self._wait_for(req, body)
                    return
                err = errno.EIO  # an operation must not refuse to wait when it may
            except FuseError as e:
                err = e.errno
            except Exception as e:  # every failure is an errno for the kernel, never a dead worker
                err = self.ops.error(abi.OP_NAMES.get(req.opcode, str(req.opcode)), req.nodeid, e)
        self._finish(req, err, reply)

    def _wait_for(self, req: Request, body: bytes) -> None:
        req.can_wait, req.interrupted = True, threading.Event()
        with self._lock:
            self._waiting[req.unique] = req
        try:
            self._pool.submit(self._run_waiting, req, body)
        except RuntimeError:  # the pool is shut down: the connection is ending
            self._finish(req, errno.EIO, b"")

    def _run_waiting(self, req: Request, body: bytes) -> None:
        if req.answered:  # interrupted while it queued
            return
        try:
            self._run(req, body)
        except BaseException:
            self._finish(req, errno.EIO, b"")
            log.exception("handling a FUSE request failed")

    def _interrupt(self, unique: int, target: int) -> None:
        """The kernel gives up on request ``target``: answer it EINTR now and stop its wait."""
        with self._lock:
            req = self._waiting.get(target)
        if req is None:
            # Not waiting here (yet): a reader is answering it right now, or is about to hand it to
            # the pool. EAGAIN makes the kernel send the interrupt again, unless it was answered.
            self._write(unique, errno.EAGAIN, b"", "interrupt")
            return
        req.interrupted.set()
        self._finish(req, errno.EINTR, b"")

    def _finish(self, req: Request, err: int, reply: bytes) -> None:
        """Send the one reply ``req`` gets; drop the references of a reply the kernel never took."""
        with self._lock:
            late = req.answered
            req.answered = True
            self._waiting.pop(req.unique, None)
        if late:  # already answered EINTR
            self._release(req)
            return
        if err:
            self._release(req)
        name = abi.OP_NAMES.get(req.opcode, str(req.opcode))
        if self.observe is not None and req.opcode != abi.INIT:  # counted before the caller can see it
            try:
                self.observe(name, err)
            except Exception:
                log.exception("counting a FUSE answer failed")
        if not self._write(req.unique, err, reply, name):
            self._release(req)

    def _write(self, unique: int, err: int, reply: bytes, name: str) -> bool:
        """Write one reply; whether the kernel took it. A refused reply is replaced by EIO."""
        body = b"" if err else reply
        try:  # two buffers at most: writev takes no more than IOV_MAX (1024)
            os.writev(self.fd, [abi.reply_header(len(body), err, unique), body])
            return True
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENODEV):  # interrupted, or the mount is gone
                return False
            log.error("answering the kernel's %s request failed: %s", name, e)
        if not err:
            try:
                os.write(self.fd, abi.reply_header(0, errno.EIO, unique))
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENODEV):
                    log.error("answering the kernel's %s request with EIO failed too: %s", name, e)
        return False

    def _release(self, req: Request) -> None:
        """Forget the references taken for a reply the kernel will not get."""
        refs, req.refs = req.refs, []
        for nodeid in refs:
            try:
                self.ops.forget(nodeid, 1)
            except Exception:
                log.exception("dropping node %d failed", nodeid)

    def _batch_forget(self, body: memoryview) -> None:
        count = struct.unpack_from("<I", body)[0]
        for i in range(min(count, (len(body) - 8) // abi.FORGET_ONE.size)):
            nodeid, n = abi.FORGET_ONE.unpack_from(body, 8 + i * abi.FORGET_ONE.size)
            self.ops.forget(nodeid, n)

    # ---- operations ----------------------------------------------------------------------
    def _init(self, req: Request, body: bytes) -> bytes:
        major, minor, max_readahead, flags = abi.INIT_IN.unpack_from(body)
        if major != 7 or minor < abi.MIN_MINOR:
            self.refused = (f"the kernel speaks FUSE protocol {major}.{minor}; als needs 7.{abi.MIN_MINOR} "
                            f"or later (Linux 4.20 or later)")
            log.error("%s", self.refused)
            raise FuseError(errno.EPROTO)
        self.no_open = bool(flags & abi.NO_OPEN_SUPPORT) and bool(flags & abi.NO_OPENDIR_SUPPORT)
        reply = abi.init_reply(max_readahead, flags)
        self.negotiated = {"minor": min(minor, abi.MINOR), "kernel_flags": abi.init_flags(body),
                           "flags": flags & abi.WANTED, "max_write": abi.MAX_WRITE, "no_open": int(self.no_open)}
        log.debug("FUSE connection: kernel protocol 7.%d, flags %#x, zero-message opens %s", minor, flags,
                  "on" if self.no_open else "off")
        self.initialized.set()
        return reply

    def _entry(self, req: Request, parent: int, name: bytes) -> bytes:
        entry = self.ops.lookup(parent, name, req)
        if entry.nodeid:
            req.refs.append(entry.nodeid)
        return entry.pack()

    def _lookup(self, req: Request, body: bytes) -> bytes:
        return self._entry(req, req.nodeid, body[:-1])

    def _getattr(self, req: Request, body: bytes) -> bytes:
        attr, timeout = self.ops.getattr(req.nodeid)
        return abi.attr_reply(attr, timeout)

    def _readlink(self, req: Request, body: bytes) -> bytes:
        return self.ops.readlink(req.nodeid)

    def _open(self, req: Request, body: bytes) -> bytes:
        flags = struct.unpack_from("<I", body)[0]
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FuseError(errno.EROFS)
        if self.no_open:  # from now on the kernel opens with no message, keeping pages and listings
            raise FuseError(errno.ENOSYS)
        return abi.OPEN_REPLY

    def _read(self, req: Request, body: bytes) -> bytes:
        _, offset, size = abi.READ_IN.unpack_from(body)
        return self.ops.read(req.nodeid, offset, size, req)

    def _readdir(self, req: Request, body: bytes) -> bytes:
        return self._listing(req, body, plus=False)

    def _readdirplus(self, req: Request, body: bytes) -> bytes:
        return self._listing(req, body, plus=True)

    def _listing(self, req: Request, body: bytes, plus: bool) -> bytes:
        """Directory entries from ``offset`` that fit in ``size``; with ``plus``, each looked up too.

        Costs what it returns: the listing is the file system's, kept, and indexed from ``offset``.
        """
        _, offset, size = abi.READ_IN.unpack_from(body)
        out, used = [], 0
        entries = self.ops.listing(req.nodeid)
        for i in range(offset, len(entries)):
            name, ino, mode = entries[i]
            rec = abi.dirent(ino, i + 1, name, mode)
            if used + len(rec) + (abi.ENTRY_SIZE if plus else 0) > size:
                break  # looked up only once it fits: the kernel counts a reference per entry sent
            if plus:  # the kernel takes no reference for "." and ".."
                rec = (bytes(abi.ENTRY_SIZE) if name in (b".", b"..") else self._entry(req, req.nodeid, name)) + rec
            out.append(rec)
            used += len(rec)
        return b"".join(out)

    def _getxattr(self, req: Request, body: bytes) -> bytes:
        size = abi.SIZE_IN.unpack_from(body)[0]
        value = self.ops.getxattr(req.nodeid, body[abi.SIZE_IN.size:-1])
        return abi.xattr_reply(value, size)

    def _listxattr(self, req: Request, body: bytes) -> bytes:
        size = abi.SIZE_IN.unpack_from(body)[0]
        return abi.xattr_reply(b"".join(n + b"\0" for n in self.ops.listxattr(req.nodeid)), size)

    def _statfs(self, req: Request, body: bytes) -> bytes:
        return abi.STATFS_REPLY

    def _create(self, req: Request, body: bytes) -> bytes:
        self.ops.create(req.nodeid, body[16:].split(b"\0", 1)[0])  # after create_in / mknod_in
        raise FuseError(errno.EROFS)

    def _rmdir(self, req: Request, body: bytes) -> bytes:
        self.ops.rmdir(req.nodeid, body[:-1])
        raise FuseError(errno.EROFS)

    def _empty(self, req: Request, body: bytes) -> bytes:
        return b""

    def _read_only(self, req: Request, body: bytes) -> bytes:
        raise FuseError(errno.EROFS)


