"""The thin FUSE adapter (fuse-python, libfuse 2 high-level API) over the store.

Paths are mapped to the store's namespace here and nowhere else:

    /                               the mount root
    /<base64(ref)>/                 an image reference (resolution starts on lookup)
    /<base64(ref)>/<digest>/        a layer, by compressed digest or TOC digest
        diff/...                    the layer's files (its LayerView)
        info                        containers/storage's Layer JSON
        blob                        the compressed blob, for push and save
        use                         never exists; creating it counts a use

Store errors become errno values in ``_errors`` and only there. Content is
immutable, so the kernel is told to cache names, attributes and pages for long.
"""

from __future__ import annotations

import base64
import errno
import functools
import logging
import os
import stat
import time

import fuse
from cachetools import LRUCache

from als import metrics
from als.errors import ALSError
from als.fetch import ChunkFetcher
from als.layer import Node
from als.digest import is_sha256
from als.store import BlobReader, Layer, LayerUnavailable, Store, decode_ref

fuse.fuse_python_api = (0, 2)
log = logging.getLogger("als.fuse")

NAMESPACE_DIR = stat.S_IFDIR | 0o700  # only root (the engine) walks the store itself
META_FILE = stat.S_IFREG | 0o400
LAYER_FILES = ("diff", "info", "blob")
_NAMESPACE_INO = 1  # d_ino of the store's own directory entries (the mount root's number)


def _errors(method):
    """Turn exceptions into negative errno values, the one place this happens; count every answer."""
    op = method.__name__
    calls = metrics.fuse_op_counter(op)

    @functools.wraps(method)
    def wrapper(self, path, *args):
        calls.inc()
        try:
            result = method(self, path, *args)
        except LayerUnavailable as e:
            result = -e.errno
        except OSError as e:
            result = -(e.errno or errno.EIO)
        except ALSError as e:
            log.error("%s %s: %s", op, path, e)
            result = -errno.EIO
        except Exception:
            log.exception("%s %s: unexpected error", op, path)
            result = -errno.EIO
        if type(result) is int and result < 0:
            metrics.fuse_error(op, -result)
        return result

    return wrapper


def _paged_in(node: Node, path: str) -> bool:
    """Programs and shared libraries: mapped and paged in out of order, so worth fetching whole."""
    base = path.rsplit("/", 1)[-1]
    return bool(node.mode & 0o111) or base.endswith(".so") or ".so." in base


class _Handle:
    """An open regular file of a layer: reads go through the chunk fetcher."""

    __slots__ = ("fetcher", "layer", "node", "path", "whole_file")

    def __init__(self, fetcher: ChunkFetcher, layer: Layer, node: Node, path: str):
        self.fetcher, self.layer, self.node, self.path = fetcher, layer, node, path
        # decided once per open, not per read: programs and libraries come whole on a miss
        self.whole_file = node.chunks if _paged_in(node, path) else ()

    def read(self, offset: int, size: int) -> bytes:
        chunks = self.node.chunks_for(offset, size)
        if not chunks:
            return b""
        try:
            pieces = self.fetcher.read(self.layer.source, chunks, self.whole_file)
        except ALSError as e:
            log.error("image %s layer %s file /%s: read failed: %s", self.layer.ref, self.layer.desc.digest,
                      self.path, e)
            raise OSError(errno.EIO, str(e)) from None
        end = min(offset + size, self.node.size)
        first = chunks[0].offset
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return data[offset - first:end - first]


class _Bytes:
    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset:offset + size]


class ALSFuse(fuse.Fuse):
    def __init__(self, store: Store, *args, on_mounted=None, **kw):
        super().__init__(*args, **kw)
        self.store = store
        self.on_mounted = on_mounted  # called once the kernel's FUSE INIT arrives
        self._t = int(time.time())
        self._nodes: LRUCache = LRUCache(maxsize=100_000)  # path -> (layer, node, parts)
        self._listings: LRUCache = LRUCache(maxsize=4_096)  # directory path -> its Direntry list

    def fsinit(self):
        """libfuse calls this on the kernel's FUSE INIT, which comes once the mount is live."""
        if self.on_mounted is not None:
            try:
                self.on_mounted()
            except Exception:  # readiness reporting must never stop the store
                log.exception("reporting the mount failed")

    # ---- path resolution ---------------------------------------------------------------
    def _split(self, path: str):
        """``(ref, digest, name, rest)`` for a path; missing parts are None."""
        parts = [p for p in path.split("/") if p]
        ref = digest = name = None
        if parts:
            ref = decode_ref(parts[0])
            if ref is None:
                raise OSError(errno.ENOENT, path)
        if len(parts) > 1:
            digest = parts[1]
            if not is_sha256(digest):
                raise OSError(errno.ENOENT, path)
        if len(parts) > 2:
            name = parts[2]
            if name not in LAYER_FILES or (name != "diff" and len(parts) > 3):
                raise OSError(errno.ENOENT, path)
        return ref, digest, name, parts[3:]

    def _layer_node(self, path: str) -> tuple[Layer, Node, list[str]]:
        """The layer and node at a path under ``diff/``; memoised, as layers never change."""
        hit = self._nodes.get(path)
        if hit is not None:
            return hit
        ref, digest, name, rest = self._split(path)
        layer = self.store.layer(ref, digest)
        node = layer.view.lookup(rest)
        if node is None:
            raise OSError(errno.ENOENT, path)
        self._nodes[path] = (layer, node, rest)
        return layer, node, rest

    def _dir_stat(self, ino: int = 0) -> fuse.Stat:
        return fuse.Stat(st_mode=NAMESPACE_DIR, st_ino=ino, st_nlink=2, st_size=4096,
                         st_atime=self._t, st_mtime=self._t, st_ctime=self._t)

    @staticmethod
    def _node_stat(node: Node) -> fuse.Stat:
        return fuse.Stat(st_mode=node.mode, st_ino=node.ino, st_nlink=node.nlink, st_uid=node.uid,
                         st_gid=node.gid, st_size=node.size, st_atime=node.mtime, st_mtime=node.mtime,
                         st_ctime=node.mtime, st_rdev=node.rdev, st_blocks=(node.size + 511) // 512,
                         st_blksize=4096)

    # ---- operations --------------------------------------------------------------------
    @_errors
    def getattr(self, path):
        hit = self._nodes.get(path)
        if hit is not None:
            return self._node_stat(hit[1])
        ref, digest, name, rest = self._split(path)
        if digest is None:
            if ref is not None:
                self.store.prepare(ref)
            return self._dir_stat(1 if ref is None else 0)
        if name is None:
            return self._dir_stat()
        layer = self.store.layer(ref, digest)
        if name == "diff":
            return self._node_stat(self._layer_node(path)[1])
        size = len(layer.info(digest)) if name == "info" else layer.desc.size
        return fuse.Stat(st_mode=META_FILE, st_nlink=1, st_size=size, st_atime=self._t,
                         st_mtime=self._t, st_ctime=self._t)

    @_errors
    def readdir(self, path, offset):
        ref, digest, name, rest = self._split(path)
        if ref is None:
            names = sorted(base64.b64encode(r.encode()).decode() for r in self.store.refs())
        elif digest is None:
            names = sorted({l.desc.digest for l in self.store.layers() if l.ref == ref})
        elif name is None:
            names = list(LAYER_FILES)
        else:
            entries = self._listings.get(path)
            if entries is None:
                layer, node, _ = self._layer_node(path)
                if not node.is_dir:
                    return -errno.ENOTDIR
                entries = [fuse.Direntry(".", ino=node.ino), fuse.Direntry("..", ino=_NAMESPACE_INO)]
                entries += [fuse.Direntry(n, type=stat.S_IFMT(c.mode), ino=c.ino)
                            for n, c in node.children.items()]
                self._listings[path] = entries  # layers never change: list each directory once
            return entries
        # glibc's readdir skips entries whose inode number is 0: give each one a number
        return [fuse.Direntry(n, ino=_NAMESPACE_INO) for n in (".", "..", *names)]

    @_errors
    def readlink(self, path):
        _, node, _ = self._layer_node(path)
        if not stat.S_ISLNK(node.mode):
            return -errno.EINVAL
        return node.target

    @_errors
    def open(self, path, flags):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            return -errno.EROFS
        if path not in self._nodes:  # not a file already looked up below some diff/
            ref, digest, name, rest = self._split(path)
            if name == "info":
                return _Bytes(self.store.layer(ref, digest).info(digest))
            if name == "blob":
                return BlobReader(self.store.layer(ref, digest))
        layer, node, rest = self._layer_node(path)
        if not node.is_reg:
            return -errno.EISDIR if node.is_dir else -errno.EACCES
        log.debug("image %s layer %s: opened /%s", layer.ref, layer.desc.digest, "/".join(rest))
        path = "/".join(rest)
        self.store.accesses.record(layer.ref, layer.desc.digest, layer.desc.index, path)
        return _Handle(self.store.fetcher, layer, node, path)

    @_errors
    def read(self, path, size, offset, fh=None):
        if fh is None:
            fh = self.open(path, os.O_RDONLY)
            if isinstance(fh, int):
                return fh
        return fh.read(offset, size)

    @_errors
    def create(self, path, flags, mode):
        """Creating `<ref>/<digest>/use` is how containers/storage says a layer is in use."""
        ref, digest, *_ = self._split(os.path.dirname(path))
        if digest is not None and os.path.basename(path) == "use":
            self.store.use(ref, digest)
            return -errno.ENOENT
        return -errno.EROFS

    @_errors
    def rmdir(self, path):
        """rmdir of `<ref>/<digest>` releases a use; nothing is ever removed."""
        ref, digest, name, _ = self._split(path)
        if digest is not None and name is None:
            self.store.release(ref, digest)
            return -errno.ENOENT
        return -errno.EROFS

    @_errors
    def getxattr(self, path, name, size):
        xattrs = self._xattrs(path)
        if name not in xattrs:
            return -errno.ENODATA
        value = xattrs[name].decode("ascii")  # the layer view admits ASCII values only
        if size == 0:
            return len(value)
        if size < len(value):
            return -errno.ERANGE
        return value

    @_errors
    def listxattr(self, path, size):
        names = list(self._xattrs(path))
        if size == 0:
            return sum(len(n.encode()) + 1 for n in names)
        return names

    def _xattrs(self, path: str) -> dict[str, bytes]:
        hit = self._nodes.get(path)
        if hit is not None:
            return hit[1].xattrs
        ref, digest, name, rest = self._split(path)
        if name != "diff":
            return {}
        return self._layer_node(path)[1].xattrs

    def statfs(self):
        return fuse.StatVfs(f_bsize=4096, f_frsize=4096, f_namemax=255)

    def mkdir(self, path, mode):
        return -errno.EROFS

    def unlink(self, path):
        return -errno.EROFS

    def write(self, path, buf, offset, fh=None):
        return -errno.EROFS
