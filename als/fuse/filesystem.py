"""The store as a FUSE file system: node ids over the store's namespace (als/fuse/session.py speaks FUSE).

    /                               the mount root
    /<base64(ref)>/                 an image reference (resolution starts on lookup)
    /<base64(ref)>/<digest>/        a layer, by compressed digest or TOC digest
        diff/...                    the layer's files (its LayerView)
        info                        containers/storage's Layer JSON
        blob                        the compressed blob, for push and save
        use                         never exists; creating it counts a use

The kernel holds a reference on every node id it was given and says when it
lets go (forget); a node id lives exactly that long here. Node ids are not
counted in memory: each one is derived from what it names, with the numbers of
the state directory's id table (als/store/ids.py), so that a store taking over
a live connection after a restart knows every id the kernel still holds and
builds its node on the first request that names it (``adopt``):

    1                               the root; 2 is .noxattr
    image id << 32                  an image reference
    name id << 32                   a layer by one of its names (blob or TOC digest)
    name id << 32 | n               its file with inode number layer id << 32 | n
    name id << 32 | SUB_*           its diff link, info and blob Store errors become
errno values in ``error`` and only there. Layer content is immutable, so names,
attributes, pages, listings and symlinks are cached by the kernel for long.

This module only translates: what to fetch for a read, and whether it would
wait, is the layer reader's to decide (als/layer/reader.py), and the blob's
verification is the blob reader's (als/store/blob.py).
"""

from __future__ import annotations

import base64
import errno
import logging
import stat
import threading
import time
from collections.abc import Sequence
from typing import Callable

from als.digest import is_sha256
from als.errors import ALSError, Interrupted
from als.fuse.abi import Attr, Entry, FuseError
from als.fuse.session import Request, WouldBlock
from als.layer.reader import LayerReader, Readable
from als.layer.resolved import Layer
from als.layer.view import MAX_LAYER_NODES, Node
from als import metrics
from als.store.blob import BlobReader
from als.store.ids import IMAGE, LAYER
from als.store.namespace import LayerUnavailable, Store, decode_ref

log = logging.getLogger("als.fuse")

NAMESPACE_DIR = stat.S_IFDIR | 0o700  # only root (the engine) walks the store itself
META_FILE = stat.S_IFREG | 0o400
ROOT, PLAIN = 1, 2
SUB_LINK, SUB_INFO, SUB_BLOB = (1 << 32) - 3, (1 << 32) - 2, (1 << 32) - 1
assert SUB_LINK > MAX_LAYER_NODES
LOW = (1 << 32) - 1
PINNED = 1 << 62  # references of the root, and of nodes taken over from a store before a restart

# what a node id stands for
K_ROOT, K_IMAGE, K_LAYER, K_INFO, K_BLOB, K_DIFF, K_LINK, K_PLAIN = range(8)
PLAIN_DIR = b".noxattr"  # where the xattr-free mount sits on the main one (no image's base64 starts with ".")


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class _Inode:
    """One node id the kernel holds: what it names and how many references the kernel took."""

    __slots__ = ("nodeid", "kind", "ref", "digest", "layer", "node", "path", "refs", "attr",
                 "data", "reader", "listing")

    def __init__(self, nodeid: int, kind: int, ref: str | None = None, digest: str | None = None,
                 layer: Layer | None = None, node: Node | None = None, path: str = ""):
        self.nodeid, self.kind = nodeid, kind
        self.ref, self.digest, self.layer, self.node, self.path = ref, digest, layer, node, path
        self.refs = 0
        self.attr: Attr | None = None
        self.data = b""  # the info file's bytes, or the link's target
        self.reader: Readable | None = None  # a layer file's or the blob's: what reads go through
        self.listing: _Listing | None = None  # a layer directory's entries, kept while the kernel holds it


class _Listing(Sequence):
    """A layer directory's entries as the kernel lists them, built once, each one on demand.

    A large directory is listed in many replies, each from an offset: holding
    its names in order makes every reply cost what it returns.
    """

    __slots__ = ("node", "names")

    def __init__(self, node: Node):
        self.node = node
        self.names = list(node.children)

    def __len__(self) -> int:
        return len(self.names) + 2

    def __getitem__(self, i: int) -> tuple[bytes, int, int]:
        if i == 0:
            return b".", self.node.ino, stat.S_IFDIR
        if i == 1:
            return b"..", ROOT, stat.S_IFDIR
        name = self.names[i - 2]
        child = self.node.children[name]
        return name.encode("utf-8", "surrogateescape"), child.ino, child.mode


def node_attr(node: Node) -> Attr:
    """A layer file's attributes as the kernel caches them."""
    return Attr(node.ino, node.mode, node.size, node.nlink, node.uid, node.gid, node.rdev, node.mtime,
                node.mtime_nsec)


class StoreFS:
    """The file system one FUSE session serves; knows the store, not the wire format.

    Overlayfs asks every lower file it looks up for an xattr (its metacopy and
    opaque marks), and FUSE has no cache for xattrs: a round trip per file, on
    every container start, even with everything cached. A FUSE connection that
    answers getxattr once with ENOSYS is never asked again. So the store runs
    two: the main mount, and one mounted on its ``.noxattr`` directory that has
    no xattrs at all. On the main mount, ``diff`` of a layer without xattrs is a
    relative symlink to the same directory under ``.noxattr`` (overlayfs follows
    it when the engine mounts the container); layers with xattrs keep ``diff``
    on the main mount.
    """

    def __init__(self, store: Store, entry_timeout: float = 3600.0, attr_timeout: float = 3600.0,
                 negative_timeout: float = 60.0, *, xattrs: bool = True, plain_mount: bool = False):
        self.store = store
        self.xattrs = xattrs  # False: the plain mount, serving only layers without xattrs
        self.plain_mount = plain_mount  # on the main mount: xattr-free layers' diff link to .noxattr
        # set by the session: drops the kernel's cached listing of a directory that has grown
        self.invalidate: Callable[[int], None] = lambda nodeid: None
        # set by the session too: makes the kernel drop a name (an evicted layer's directory)
        self.invalidate_entry: Callable[[int, bytes], None] = lambda parent, name: None
        self.reader = LayerReader(store.fetcher, store.accesses, store.predictor)
        self.entry_timeout, self.attr_timeout, self.negative_timeout = entry_timeout, attr_timeout, negative_timeout
        self._t = int(time.time())
        self._lock = threading.Lock()
        self.ids = store.state.ids
        self._inodes: dict[int, _Inode] = {}
        root = _Inode(ROOT, K_ROOT)
        root.attr = self._dir_attr(ROOT)
        root.refs = PINNED  # the kernel never forgets the root
        self._inodes[ROOT] = root

    # ---- node ids ------------------------------------------------------------------------
    def _inode(self, nodeid: int) -> _Inode:
        ino = self._inodes.get(nodeid)
        if ino is None:
            raise FuseError(errno.ESTALE)
        return ino

    def _entry(self, nodeid: int, make, grows: int = 0) -> Entry:
        """``nodeid`` with one more kernel reference; ``make(nodeid)`` builds its node if it has none.

        ``grows``: the parent whose listing a new node adds to (the root, an image): the
        kernel caches listings until told otherwise.
        """
        with self._lock:
            ino = self._inodes.get(nodeid)
            new = ino is None
            if new:
                ino = self._inodes[nodeid] = make(nodeid)
            ino.refs += 1
        if new and grows:
            self.invalidate(grows)
        return Entry(ino.nodeid, ino.attr, self.entry_timeout, self.attr_timeout)

    def forget(self, nodeid: int, count: int) -> None:
        with self._lock:
            ino = self._inodes.get(nodeid)
            if ino is None:
                return
            ino.refs -= count
            if ino.refs <= 0:
                del self._inodes[nodeid]

    def _dir_attr(self, ino: int) -> Attr:
        return Attr(ino, NAMESPACE_DIR, 4096, 2, mtime=self._t)

    # ---- lookups -------------------------------------------------------------------------
    def _layer(self, ref: str, digest: str, req: Request) -> Layer:
        """The resolved layer; waiting for it only where the request may wait."""
        layer = self.store.ready_layer(ref, digest)
        if layer is not None:
            return layer
        if not req.can_wait:
            raise WouldBlock
        return self.store.layer(ref, digest, cancel=req.interrupted)

    def lookup(self, parent: int, name: bytes, req: Request) -> Entry:
        p = self._inode(parent)
        kind = p.kind
        if kind == K_DIFF:
            return self._lookup_diff(p, name)
        if kind == K_ROOT:
            if name == PLAIN_DIR:  # the mount point of the xattr-free mount
                return self._entry(PLAIN, self._plain_node)
            ref = decode_ref(_name(name))
            if ref is None:
                raise FuseError(errno.ENOENT)
            self.store.prepare(ref)  # resolution starts on the first lookup under an image
            return self._entry(self.ids.image(ref) << 32, lambda nodeid: self._image_node(nodeid, ref), grows=ROOT)
        if kind == K_IMAGE:
            digest = _name(name)
            if not is_sha256(digest):
                raise FuseError(errno.ENOENT)
            if req.pid:
                self.store.consumers.seen(req.pid)  # which containers/storage asks (some lose layers)
            layer = self._layer(p.ref, digest, req)
            return self._entry(self.ids.layer(p.ref, digest) << 32,
                               lambda nodeid: self._layer_node(nodeid, p.ref, digest, layer), grows=p.nodeid)
        if kind == K_LAYER:
            return self._lookup_layer_file(p, name, req)
        raise FuseError(errno.ENOTDIR)

    def _lookup_layer_file(self, p: _Inode, name: bytes, req: Request) -> Entry:
        layer = self._layer(p.ref, p.digest, req)
        base = p.nodeid
        if name == b"diff" and self.plain_mount and not layer.view.has_xattrs:
            return self._entry(base | SUB_LINK, lambda nodeid: self._link_node(nodeid, p.ref, p.digest, layer))
        if name == b"diff" and not self.xattrs and layer.view.has_xattrs:
            raise FuseError(errno.ENOENT)  # served on the main mount, which answers xattrs
        if name == b"diff":
            root = layer.view.root
            return self._entry(base | (root.ino & LOW),
                               lambda nodeid: self._diff_node(nodeid, p.ref, p.digest, layer, root, "", root))
        if name not in (b"info", b"blob"):
            raise FuseError(errno.ENOENT)  # `use` included: it never exists
        sub = SUB_INFO if name == b"info" else SUB_BLOB
        return self._entry(base | sub, lambda nodeid: self._meta_node(nodeid, p.ref, p.digest, layer))

    def _lookup_diff(self, p: _Inode, name: bytes) -> Entry:
        children = p.node.children
        if children is None:
            raise FuseError(errno.ENOTDIR)
        text = _name(name)
        child = children.get(text)
        if child is None:
            return Entry.missing(self.negative_timeout)  # layers never change: misses can be cached too
        path = f"{p.path}/{text}" if p.path else text
        return self._entry((p.nodeid & ~LOW) | (child.ino & LOW),
                           lambda nodeid: self._diff_node(nodeid, p.ref, p.digest, p.layer, child, path, p.node))

    # ---- nodes, from a lookup or taken over ------------------------------------------------
    def _plain_node(self, nodeid: int) -> _Inode:
        ino = _Inode(nodeid, K_PLAIN)
        ino.attr = self._dir_attr(nodeid)
        return ino

    def _image_node(self, nodeid: int, ref: str) -> _Inode:
        ino = _Inode(nodeid, K_IMAGE, ref)
        ino.attr = self._dir_attr(nodeid)
        return ino

    def _layer_node(self, nodeid: int, ref: str, digest: str, layer: Layer) -> _Inode:
        ino = _Inode(nodeid, K_LAYER, ref, digest, layer)
        ino.attr = self._dir_attr(nodeid)
        return ino

    def _link_node(self, nodeid: int, ref: str, digest: str, layer: Layer) -> _Inode:
        ino = _Inode(nodeid, K_LINK, ref, digest, layer)
        ref_dir = base64.b64encode(ref.encode()).decode()
        ino.data = b"../../%s/%s/%s/diff" % (PLAIN_DIR, ref_dir.encode(), digest.encode())
        ino.attr = Attr(nodeid, stat.S_IFLNK | 0o777, len(ino.data), mtime=self._t)
        return ino

    def _meta_node(self, nodeid: int, ref: str, digest: str, layer: Layer) -> _Inode:
        """``info`` or ``blob``, by the low half of ``nodeid``."""
        if nodeid & LOW == SUB_INFO:
            ino = _Inode(nodeid, K_INFO, ref, digest, layer)
            ino.data = layer.info(digest)
            size = len(ino.data)
        else:
            ino = _Inode(nodeid, K_BLOB, ref, digest, layer)
            ino.reader = BlobReader(layer, self.store.fetcher.cache.root)
            size = layer.desc.size
        ino.attr = Attr(nodeid, META_FILE, size, mtime=self._t)
        return ino

    def _diff_node(self, nodeid: int, ref: str, digest: str, layer: Layer, node: Node, path: str,
                   directory: Node) -> _Inode:
        ino = _Inode(nodeid, K_DIFF, ref, digest, layer, node, path)
        ino.attr = node_attr(node)
        if node.is_reg:
            ino.reader = self.reader.open(layer, node, path, directory)
        return ino

    def adopt(self, nodeid: int, req: Request) -> None:
        """Build the node of an id the kernel holds from before a restart of the store, if need be.

        Called by the session for every request before it is answered (a dict
        lookup when the node exists). The id says what it names (see the module
        docstring); a layer comes from memory, or from saved metadata on the
        waiting pool. The kernel's count of references is unknown, so a node
        taken over stays until the store stops. An id never handed out is ESTALE.
        """
        if nodeid in self._inodes:
            return
        ino = self._rebuild(nodeid, req)
        with self._lock:
            if nodeid not in self._inodes:
                ino.refs = PINNED
                self._inodes[nodeid] = ino
                log.debug("took over node %d from before the restart", nodeid)

    def _rebuild(self, nodeid: int, req: Request) -> _Inode:
        if nodeid == PLAIN:
            return self._plain_node(nodeid)
        named = self.ids.name(nodeid >> 32)
        sub = nodeid & LOW
        if named is None:
            raise FuseError(errno.ESTALE)
        kind, ref, digest = named
        if kind == IMAGE and sub == 0:
            self.store.prepare(ref)
            return self._image_node(nodeid, ref)
        if kind != LAYER:
            raise FuseError(errno.ESTALE)
        layer = self.store.ready_layer(ref, digest)
        if layer is None:
            if not req.can_wait:
                raise WouldBlock
            layer = self.store.known_layer(ref, digest, cancel=req.interrupted)
        if sub == 0:
            return self._layer_node(nodeid, ref, digest, layer)
        if sub == SUB_LINK:
            return self._link_node(nodeid, ref, digest, layer)
        if sub in (SUB_INFO, SUB_BLOB):
            return self._meta_node(nodeid, ref, digest, layer)
        found = layer.view.find((layer.layer_id << 32) | sub)
        if found is None:
            raise FuseError(errno.ESTALE)
        node, path, directory = found
        return self._diff_node(nodeid, ref, digest, layer, node, path, directory)

    def evicted(self, ref: str, digest: str) -> None:
        """The store let go of a layer nobody uses: have the kernel let go of its nodes too, so that
        its tree is freed (a later lookup rebuilds it)."""
        image = self.ids.find(IMAGE, ref)
        if image is not None:
            self.invalidate_entry(image << 32, digest.encode())

    # ---- attributes and contents ---------------------------------------------------------
    def getattr(self, nodeid: int) -> tuple[Attr, float]:
        ino = self._inode(nodeid)
        if ino.kind == K_IMAGE:
            self.store.prepare(ino.ref)  # re-resolves once the resolution's time to live has passed
        return ino.attr, self.attr_timeout

    def readlink(self, nodeid: int) -> bytes:
        ino = self._inode(nodeid)
        if ino.kind == K_LINK:
            return ino.data
        node = ino.node
        if node is None or not stat.S_ISLNK(node.mode):
            raise FuseError(errno.EINVAL)
        return node.target.encode("utf-8", "surrogateescape")

    def read(self, nodeid: int, offset: int, size: int, req: Request) -> bytes:
        ino = self._inode(nodeid)
        if ino.kind == K_INFO:
            return ino.data[offset:offset + size]
        reader = ino.reader
        if reader is None:
            raise FuseError(errno.EISDIR)
        if not req.can_wait and not reader.ready(offset, size):
            raise WouldBlock  # nothing has happened yet: the waiting pool runs all of this again
        try:
            return reader.read(offset, size, req.interrupted)
        except Interrupted:
            raise FuseError(errno.EINTR) from None
        except ALSError:
            raise FuseError(errno.EIO) from None  # the reader logged why, once

    def listing(self, nodeid: int) -> Sequence[tuple[bytes, int, int]]:
        ino = self._inode(nodeid)
        if ino.kind == K_DIFF:
            if ino.node.children is None:
                raise FuseError(errno.ENOTDIR)
            if ino.listing is None:
                ino.listing = _Listing(ino.node)
            return ino.listing
        # glibc's readdir skips entries whose inode number is 0: give each one a number
        dots = [(b".", nodeid, stat.S_IFDIR), (b"..", ROOT, stat.S_IFDIR)]
        if ino.kind == K_LAYER:
            linked = self.plain_mount and not ino.layer.view.has_xattrs
            return dots + [(b"diff", ROOT, stat.S_IFLNK if linked else stat.S_IFDIR),
                           (b"info", ROOT, stat.S_IFREG), (b"blob", ROOT, stat.S_IFREG)]
        if ino.kind == K_PLAIN:
            return dots  # the xattr-free mount covers it
        if ino.kind == K_ROOT:
            names = sorted(base64.b64encode(r.encode()) for r in self.store.refs())
        elif ino.kind == K_IMAGE:
            names = sorted({l.desc.digest.encode() for l in self.store.layers() if l.ref == ino.ref})
        else:
            raise FuseError(errno.ENOTDIR)
        return dots + [(n, ROOT, stat.S_IFDIR) for n in names]

    def getxattr(self, nodeid: int, name: bytes) -> bytes:
        if not self.xattrs:
            raise FuseError(errno.ENOSYS)  # the kernel stops asking this connection for good
        node = self._inode(nodeid).node
        value = None if node is None else node.xattrs.get(_name(name))
        if value is None:
            raise FuseError(errno.ENODATA)
        return value

    def listxattr(self, nodeid: int) -> list[bytes]:  # answered on both mounts: tools list, overlay does not
        node = self._inode(nodeid).node
        return [] if node is None else [n.encode("utf-8", "surrogateescape") for n in node.xattrs]

    # ---- the use protocol ----------------------------------------------------------------
    def create(self, parent: int, name: bytes) -> None:
        """Creating `<ref>/<digest>/use` is how containers/storage says a layer is in use."""
        p = self._inode(parent)
        if p.kind == K_LAYER and name == b"use":
            self.store.use(p.ref, p.digest)
            raise FuseError(errno.ENOENT)

    def rmdir(self, parent: int, name: bytes) -> None:
        """rmdir of `<ref>/<digest>` releases a use; nothing is ever removed."""
        p = self._inode(parent)
        if p.kind == K_IMAGE and is_sha256(_name(name)):
            self.store.release(p.ref, _name(name))
            raise FuseError(errno.ENOENT)

    # ---- errors and metrics --------------------------------------------------------------
    def error(self, op: str, nodeid: int, exc: Exception) -> int:
        """Store errors as errno values, the one place this happens."""
        if isinstance(exc, LayerUnavailable):
            return exc.errno
        if isinstance(exc, Interrupted):
            return errno.EINTR
        if isinstance(exc, OSError):
            return exc.errno or errno.EIO
        if isinstance(exc, ALSError):
            log.error("%s of node %d: %s", op, nodeid, exc)
        else:
            log.error("%s of node %d: unexpected error", op, nodeid, exc_info=exc)
        return errno.EIO


def observer():
    """Counts every answer by operation, and errors by errno, for the metrics."""
    counters: dict[str, object] = {}

    def observe(op: str, err: int) -> None:
        c = counters.get(op)
        if c is None:
            c = counters[op] = metrics.fuse_op_counter(op)
        c.inc()
        if err:
            metrics.fuse_error(op, err)
    return observe
