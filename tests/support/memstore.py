"""The store and its FUSE file system over an in-memory registry, driven in the test's own process.

No registry process, no mount, no root: ``Harness`` builds what `als serve`
builds (a ``Store`` with its chunk fetcher, chunk cache and state directory,
and a ``StoreFS`` over it) on a ``MemoryRegistry``, and calls the file system's
operations by node id with ``Request`` objects, as the FUSE session does. An
error comes back as the kernel would see it: an ``OSError`` with the errno the
session would have answered (``StoreFS.error`` turns store errors into one).
``WouldBlock`` is raised as it is: with ``can_wait=False`` an operation that
must wait says so instead of answering.

The images come from the project's own writers (``als.tools.image``,
``als.formats.zstdchunked``), pushed into the in-memory registry.
"""

from __future__ import annotations

import base64
import errno
import io
import itertools
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from als.config import load_config
from als.formats import zstdchunked, zstdchunked_writer
from als.fuse import abi
from als.fuse.filesystem import ROOT, StoreFS
from als.fuse.abi import Attr, Entry, FuseError
from als.fuse.session import Request, WouldBlock
from als.reference import parse_reference
from als.ops.daemon import build_store
from als.tools.image import BuiltLayer, estargz_layer, gzip_layer, push_image
from tests.support import images
from tests.support.memregistry import MemoryRegistry

# No background fetch and no startup prediction: what a test reads is all that is fetched.
QUIET = "[fetch]\nbackground = false\npredict = false\n"
READ_SIZE = 128 << 10  # what one FUSE read asks for (the kernel's read size)


def ref_dir(ref: str) -> str:
    """The top-level directory name of image ``ref``."""
    return base64.b64encode(ref.encode()).decode()


# ---- images --------------------------------------------------------------------------------
def estargz(entries: Sequence[images.Entry], chunk_size: int = 4 << 20, level: int = 9) -> BuiltLayer:
    """An eStargz layer of ``entries`` (tests/support/images.py), with its TOC digest annotation.

    ``level`` 0 stores the data: files of equal sizes then sit at equal offsets in two layers.
    """
    return estargz_layer(io.BytesIO(images.layer_tar(entries)), chunk_size=chunk_size, level=level)


def zstd_chunked(entries: Sequence[images.Entry], chunk_size: int = 4 << 20) -> BuiltLayer:
    """A zstd:chunked layer of ``entries``, with the annotations Podman writes and its size."""
    blob = io.BytesIO()
    r = zstdchunked_writer.write_zstdchunked(io.BytesIO(images.layer_tar(entries)), blob, chunk_size=chunk_size)
    return BuiltLayer(blob=blob, digest=r.blob_digest, size=r.compressed_size, diff_id=r.diff_id,
                      annotations=r.annotations(), media_type=zstdchunked.MEDIA_TYPE)


def plain_gzip(entries: Sequence[images.Entry]) -> BuiltLayer:
    """A plain gzip layer: no TOC, so never served lazily."""
    return gzip_layer(images.layer_tar(entries))


def push(registry: MemoryRegistry, ref: str, layers: list[BuiltLayer]) -> str:
    """Push an image of ``layers`` as ``ref``; returns its manifest digest."""
    return push_image(registry, parse_reference(ref), layers)


# ---- the store and file system -------------------------------------------------------------
class Harness:
    """A store and its file system over ``registry``, with calls shaped like the FUSE session's."""

    def __init__(self, work: Path, config: str = QUIET, registry: MemoryRegistry | None = None):
        path = work / "config.toml"
        path.write_text(config)
        self.config = load_config(path)
        self.registry = registry or MemoryRegistry()
        self.store = build_store(work / "root", self.config, client=self.registry)  # as `als serve` builds it
        self.fetcher = self.store.fetcher
        self.cache = self.fetcher.cache
        self.fs = StoreFS(self.store)
        self._unique = itertools.count(2, 2)

    def close(self) -> None:
        self.store.close()

    # ---- requests ----------------------------------------------------------------------------
    def request(self, opcode: int, nodeid: int, *, can_wait: bool = True, pid: int = 0) -> Request:
        return Request(next(self._unique), opcode, nodeid, pid, can_wait=can_wait,
                       interrupted=threading.Event() if can_wait else None)

    def call(self, op: str, nodeid: int, fn: Callable, *args):
        """``fn(*args)`` answered as the session answers it: an errno (OSError) or the result."""
        try:
            return fn(*args)
        except (FuseError, WouldBlock):
            raise
        except Exception as e:
            err = self.fs.error(op, nodeid, e)
            raise OSError(err, f"{op} of node {nodeid}: {e}") from e

    # ---- operations ----------------------------------------------------------------------------
    def lookup(self, parent: int, name: str | bytes, *, can_wait: bool = True, pid: int = 0) -> Entry:
        raw = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
        req = self.request(abi.LOOKUP, parent, can_wait=can_wait, pid=pid)
        return self.call("lookup", parent, self.fs.lookup, parent, raw, req)

    def walk(self, *names: str, can_wait: bool = True) -> int:
        """The node id of ``names`` from the root; a name that does not exist is ENOENT."""
        nodeid = ROOT
        for name in names:
            entry = self.lookup(nodeid, name, can_wait=can_wait)
            if entry.nodeid == 0:
                raise FuseError(errno.ENOENT)  # the negative entry the kernel would cache
            nodeid = entry.nodeid
        return nodeid

    def layer(self, ref: str, digest: str, *path: str) -> int:
        """The node id of ``<ref>/<digest>/<path...>``."""
        return self.walk(ref_dir(ref), digest, *path)

    def getattr(self, nodeid: int) -> Attr:
        return self.call("getattr", nodeid, self.fs.getattr, nodeid)[0]

    def read(self, nodeid: int, offset: int, size: int, *, can_wait: bool = True) -> bytes:
        req = self.request(abi.READ, nodeid, can_wait=can_wait)
        return self.call("read", nodeid, self.fs.read, nodeid, offset, size, req)

    def read_all(self, nodeid: int) -> bytes:
        """The whole file in kernel-sized reads, up to the size its attributes give."""
        size = self.getattr(nodeid).size
        return b"".join(self.read(nodeid, offset, READ_SIZE) for offset in range(0, size, READ_SIZE))

    def listing(self, nodeid: int) -> list[tuple[bytes, int, int]]:
        return list(self.call("readdir", nodeid, self.fs.listing, nodeid))

    def names(self, nodeid: int) -> list[str]:
        """A directory's names, without ``.`` and ``..``."""
        return [n.decode("utf-8", "surrogateescape") for n, _, _ in self.listing(nodeid) if n not in (b".", b"..")]

    def readlink(self, nodeid: int) -> bytes:
        return self.call("readlink", nodeid, self.fs.readlink, nodeid)

    def getxattr(self, nodeid: int, name: str) -> bytes:
        return self.call("getxattr", nodeid, self.fs.getxattr, nodeid, name.encode())

    def listxattr(self, nodeid: int) -> list[bytes]:
        return self.call("listxattr", nodeid, self.fs.listxattr, nodeid)

    def use(self, ref: str, digest: str) -> OSError | None:
        """Create `<ref>/<digest>/use`, as containers/storage does; the error it answers (ENOENT)."""
        layer = self.layer(ref, digest)
        return self._errno("create", layer, self.fs.create, layer, b"use")

    def release(self, ref: str, digest: str) -> OSError | None:
        """rmdir `<ref>/<digest>`, as containers/storage does; the error it answers (ENOENT)."""
        image = self.walk(ref_dir(ref))
        return self._errno("rmdir", image, self.fs.rmdir, image, digest.encode())

    def _errno(self, op: str, nodeid: int, fn: Callable, *args) -> OSError | None:
        try:
            self.call(op, nodeid, fn, *args)
        except OSError as e:
            return e
        return None


@contextmanager
def harness(work: Path, config: str = QUIET, registry: MemoryRegistry | None = None) -> Iterator[Harness]:
    h = Harness(work, config, registry)
    try:
        yield h
    finally:
        h.close()
