"""A layer's compressed blob for export (`podman save`, `podman push`): verified whole before any byte leaves.

The kernel reads `blob` in whatever order its read-ahead and the reader's
threads produce, so hashing reads as they arrive cannot vouch for them: a
byte would be served before the hash is complete, and an out-of-order read
would leave the hash forever incomplete, the mismatch never reported. So the
first read downloads the whole blob once, hashing it as it streams into an
anonymous spool file in the cache directory, and nothing is served until it
matches the layer's digest; then every read is a `pread` of the spool.
Memory stays bounded by one network read whatever the blob's size. The
spool disappears with the reader (the kernel forgot the inode), a minute after
its last read (the kernel may keep the inode for hours), or with the daemon.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import BinaryIO

from als.errors import ALSError, CacheError, Interrupted, VerificationError
from als.layer.resolved import Layer
from als.wait import wait_for

log = logging.getLogger("als.blob")

RANGE = 16 << 20  # bytes per registry request of the download
POLL = 0.05  # seconds between two looks at whether a freed reader's spool may close
# Seconds a verified spool is kept after its last read. The kernel may keep a `blob` inode
# (and so its reader) for hours after the engine closed it, and a spool is the blob's size.
IDLE = 60.0


class _Dropped(Exception):
    """The reader went away mid-download: nobody will read what is being spooled."""


class _Download:
    """One attempt at the whole blob: a thread that streams it into a spool file and then keeps it.

    The thread owns the spool from start to end and is the only one to close
    it: on failure, when the reader is dropped, or after ``idle`` seconds
    without a read. It holds no reference to its reader, so that dropping the
    reader can stop it.
    """

    def __init__(self, layer: Layer, spool_dir: Path, idle: float):
        self.layer = layer
        self.spool_dir = spool_dir
        self.idle = idle
        self.outcome: Future = Future()  # -> None once verified; or the ALSError that ended it
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._spool: BinaryIO | None = None  # open while verified and kept
        self._users = 0  # preads of the spool under way
        self._last = 0.0  # when the last one ended
        threading.Thread(target=self._run, name=f"als-blob-{layer.desc.digest[7:19]}", daemon=True).start()

    def verified(self) -> bool:
        """Verified and still spooled: reads are local."""
        return self._spool is not None

    def over(self) -> bool:
        """Failed, or verified and since freed: a read needs a new download."""
        return self.outcome.done() and self._spool is None

    def drop(self) -> None:
        """Stop the download, or free the spool (the reader is gone)."""
        self._stop.set()

    def pread(self, offset: int, end: int) -> bytes | None:
        """Bytes [offset, end) of the verified blob; None if the spool has been freed."""
        with self._lock:
            spool = self._spool
            if spool is None:
                return None
            self._users += 1
        try:
            fd, parts = spool.fileno(), []
            while offset < end:
                part = os.pread(fd, end - offset, offset)
                if not part:  # the spool was verified at full size: only a broken disk gets here
                    raise CacheError(f"{self.layer.source.label}: blob spool ends early at byte {offset}")
                parts.append(part)
                offset += len(part)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            with self._lock:
                self._users -= 1
                self._last = time.monotonic()

    def _run(self) -> None:
        label = self.layer.source.label
        t0 = time.monotonic()
        spool = None
        try:
            # O_TMPFILE where the file system has it, else created and unlinked at once; mode 0600
            spool = tempfile.TemporaryFile(dir=self.spool_dir)
            self._fill(spool)
            spool.flush()
        except BaseException as e:  # every waiting read must hear of it, whatever it is
            if spool is not None:
                spool.close()
            self.outcome.set_exception(self._explain(e))
            return
        if self._stop.is_set():
            spool.close()
            self.outcome.set_exception(self._explain(_Dropped()))
            return
        with self._lock:
            self._spool, self._last = spool, time.monotonic()
        self.outcome.set_result(None)
        log.info("%s: blob downloaded and verified for export (%d bytes in %.2fs)", label,
                 self.layer.desc.size, time.monotonic() - t0)
        self._keep(spool)

    def _keep(self, spool: BinaryIO) -> None:
        """Hold the spool until the reader is dropped or nobody has read it for ``idle`` seconds."""
        while True:
            if self._stop.is_set():
                time.sleep(POLL)  # only while a read finishes
            else:
                self._stop.wait(min(self.idle / 4, 5.0))
            with self._lock:
                if self._users == 0 and (self._stop.is_set() or time.monotonic() - self._last >= self.idle):
                    self._spool = None
                    break
        spool.close()
        log.debug("%s: blob spool freed (%s)", self.layer.source.label,
                  "reader gone" if self._stop.is_set() else f"no read for {self.idle:g}s")

    def _fill(self, spool: BinaryIO) -> None:
        desc, source = self.layer.desc, self.layer.source
        h = hashlib.sha256()

        def sink(piece: bytes) -> None:
            if self._stop.is_set():
                raise _Dropped()
            h.update(piece)
            spool.write(piece)

        log.info("%s: downloading the blob to verify it before export (%d bytes)", source.label, desc.size)
        got = 0
        for start in range(0, desc.size, RANGE):
            got += source.stream_range(start, min(start + RANGE, desc.size), sink)
        if got != desc.size or "sha256:" + h.hexdigest() != desc.digest:
            raise VerificationError(f"{source.label}: blob does not match its digest")

    def _explain(self, e: BaseException) -> ALSError:
        """The error every waiting read raises, logged once in the operator's words."""
        label = self.layer.source.label
        if isinstance(e, VerificationError):
            log.error("%s: blob does not match its digest; refusing to export it", label)
            return e
        if isinstance(e, _Dropped):
            log.debug("%s: blob download stopped: its reader is gone", label)
            return ALSError(f"{label}: blob reader dropped")
        if isinstance(e, ALSError):
            log.warning("%s: blob download failed: %s", label, e)
            return e
        if isinstance(e, OSError):
            log.error("%s: cannot spool the blob in %s: %s", label, self.spool_dir, e)
            return CacheError(f"{label}: cannot spool the blob in {self.spool_dir}: {e.strerror or e}")
        log.error("%s: blob download failed unexpectedly", label, exc_info=e)
        return ALSError(f"{label}: blob download failed: {e!r}")


class _Slot:
    """The reader's current download, kept apart from the reader so its finalizer can reach it."""

    def __init__(self) -> None:
        self.download: _Download | None = None

    def drop(self) -> None:
        if self.download is not None:
            self.download.drop()


class BlobReader:
    """Reads of one layer's compressed blob, in any order, from any number of threads.

    Concurrent reads share one download; a failed one (registry trouble, or a
    blob that does not match its digest) fails every read waiting for it, and
    the next read starts again from scratch, as does a read after the spool
    was freed for want of reads.
    """

    def __init__(self, layer: Layer, spool_dir: Path, idle: float = IDLE):
        self.layer = layer
        self.spool_dir = Path(spool_dir)
        self.idle = idle
        self._lock = threading.Lock()
        self._slot = _Slot()
        weakref.finalize(self, self._slot.drop)

    def ready(self, offset: int = 0, size: int = 0) -> bool:
        """True when a read (of any range) will not wait on the network: the blob is verified and spooled."""
        d = self._slot.download
        return d is not None and d.verified()

    def read(self, offset: int, size: int, cancel: threading.Event | None = None) -> bytes:
        """Bytes [offset, offset+size) of the verified blob; b"" past its end.

        Blocks until the whole blob is downloaded and verified; raises
        Interrupted as soon as ``cancel`` is set while it waits (the download
        goes on for the next read), and the download's ALSError if it failed.
        """
        end = min(offset + size, self.layer.desc.size)
        if offset < 0 or offset >= end:
            return b""
        for _ in range(3):  # the spool may be freed (idle) between the wait and the read: fetch it again
            d = self._download()
            self._wait(d, cancel)
            data = d.pread(offset, end)
            if data is not None:
                return data
        raise ALSError(f"{self.layer.source.label}: blob spool freed before it could be read, three times")

    def _download(self) -> _Download:
        with self._lock:
            d = self._slot.download
            if d is None or d.over():
                d = self._slot.download = _Download(self.layer, self.spool_dir, self.idle)
            return d

    def _wait(self, d: _Download, cancel: threading.Event | None) -> None:
        try:
            wait_for(d.outcome, None, cancel)
        except Interrupted:
            raise Interrupted(f"{self.layer.source.label}: blob read interrupted while the blob downloads") from None
