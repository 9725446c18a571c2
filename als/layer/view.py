"""The layer view: an immutable file tree built once from a parsed TOC.

Everything a FUSE lookup, getattr, readdir, readlink or getxattr needs is
computed here at resolve time (overlay whiteouts and opaque markers, hard link
counts, inode numbers), so those operations are dictionary lookups with no I/O.
Reads only need the node's chunk list; the chunk reader fetches the bytes.

The tree follows tar extraction semantics (a later entry replaces an earlier
one of the same name) but refuses anything that could reach outside the layer:
names are already cleaned by the format parser, entries below a non-directory
(a path through a symlink) and hard links to missing or non-regular entries
are dropped with a logged reason.
"""

from __future__ import annotations

import bisect
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from als.errors import FormatError
from als.formats.tocentries import MAX_TOC_ENTRIES
from als.formats import toc as T

log = logging.getLogger("als.layer")

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
HIDDEN_AT_ROOT = frozenset({".prefetch.landmark", ".no.prefetch.landmark", "stargz.index.json"})
OPAQUE_XATTRS = {"trusted.overlay.opaque": b"y", "user.overlay.opaque": b"y"}
DIR_SIZE = 4096  # what ext4/xfs report, so `ls -l` matches a normally pulled layer
# A layer's inode numbers are its base plus 1..this: they stay below the next layer's base, and
# leave the top 16 of each 2**32 range free for names the FUSE layer adds (info, blob).
MAX_LAYER_NODES = (1 << 32) - 17
# Shared by every node they describe, so that a tree of many thousand files does not hold as
# many empty dicts and one-element lists: never changed in place.
NO_XATTRS: dict[str, bytes] = {}
ONE_CHUNK = (0,)

_TYPE_BITS = {
    T.DIR: stat.S_IFDIR,
    T.REG: stat.S_IFREG,
    T.SYMLINK: stat.S_IFLNK,
    T.CHAR: stat.S_IFCHR,
    T.BLOCK: stat.S_IFBLK,
    T.FIFO: stat.S_IFIFO,
}


@dataclass(eq=False, slots=True)
class Node:
    """One inode of the layer; hard links are one Node under several names."""

    ino: int
    mode: int  # full st_mode: type bits | permission bits
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0
    nlink: int = 1
    rdev: int = 0
    target: str = ""  # symlink target
    # Never changed in place: the many nodes without any share one empty mapping (NO_XATTRS).
    xattrs: dict[str, bytes] = field(default_factory=lambda: NO_XATTRS)
    children: dict[str, "Node"] | None = None  # directories only
    chunks: Sequence[T.Chunk] = ()
    chunk_offsets: Sequence[int] = ()  # for bisect; the many one-chunk files share ONE_CHUNK
    mtime_nsec: int = 0

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def chunks_for(self, offset: int, size: int) -> list[T.Chunk]:
        """The chunks that cover file bytes [offset, offset+size)."""
        end = min(offset + size, self.size)
        if offset >= end:
            return []
        i = max(bisect.bisect_right(self.chunk_offsets, offset) - 1, 0)
        out = []
        while i < len(self.chunks) and self.chunks[i].offset < end:
            out.append(self.chunks[i])
            i += 1
        return out


class LayerView:
    """The tree of one layer. ``ino_base`` keeps inode numbers unique across layers."""

    def __init__(self, entries: list[T.Entry], ino_base: int = 0, label: str = "layer",
                 max_nodes: int = MAX_TOC_ENTRIES + 65536, consume: bool = False):
        """``consume``: take each entry out of ``entries`` (and its chunk list into the tree) as it is
        built, so that a layer's entries and its tree are not all in memory at once."""
        self._next_ino = ino_base + 1
        self._last_ino = ino_base + max_nodes  # implicit parents too: a hostile TOC cannot build a huge tree
        self.label = label
        self.root = self._new_node(stat.S_IFDIR | 0o755, children={})
        self.rejected: list[str] = []
        self.unservable: list[str] = []  # reasons the layer cannot be presented faithfully over FUSE
        self.file_count = 0
        self._consume = consume
        self._build(_consumed(entries) if consume else entries)
        # overlay opaque marks included: a layer without any is served where the kernel never asks
        self.has_xattrs = any(n.xattrs for n in self._nodes())
        self._by_ino: dict[int, tuple[Node, str, Node]] | None = None  # built when first asked

    def _nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            if node.children:
                stack.extend(node.children.values())

    # ---- building ---------------------------------------------------------------
    def _take_ino(self) -> int:
        """The next inode number; running out means a hostile TOC is building a huge tree."""
        ino = self._next_ino
        if ino > self._last_ino:
            raise FormatError(f"its tree has more than {self._last_ino - self.root.ino + 1} nodes")
        self._next_ino = ino + 1
        return ino

    def _new_node(self, mode: int, **kw) -> Node:
        return Node(ino=self._take_ino(), mode=mode, **kw)

    def _reject(self, name: str, why: str) -> None:
        self.rejected.append(f"{name}: {why}")
        log.warning("%s: ignoring TOC entry %r: %s", self.label, name, why)

    def _parent_of(self, head: str, name: str, dirs: dict[str, Node]) -> Node | None:
        """The directory ``head`` that will hold entry ``name``, creating missing ones like tar does.

        ``dirs`` remembers the directories found so far by path: a tar lists a
        directory's entries together, so most entries skip the walk from the
        root. The caller empties it whenever a name is replaced, the only way
        a remembered path can stop naming that directory.
        """
        node = dirs.get(head)
        if node is None:
            node = self._walk_to(head.split("/"), name)
            if node is not None:
                dirs[head] = node
        return node

    def _walk_to(self, parts: list[str], name: str) -> Node | None:
        """The directory at ``parts``, creating missing ones; None if a component is not one."""
        node = self.root
        for part in parts:
            child = node.children.get(part)
            if child is None:
                child = self._new_node(stat.S_IFDIR | 0o755, children={})
                node.children[part] = child
            elif not child.is_dir:
                self._reject(name, "a parent path component is not a directory")
                return None
            node = child
        return node

    def _build(self, entries: Iterable[T.Entry]) -> None:
        opaque: list[Node] = []
        whiteouts: list[tuple[Node, str, T.Entry]] = []
        dirs = {"": self.root}  # see _parent_of
        for e in entries:
            if e.name == "":
                self._apply_meta(self.root, e)
                continue
            head, _, base = e.name.rpartition("/")
            if not head and base in HIDDEN_AT_ROOT:
                continue
            parent = self._parent_of(head, e.name, dirs)
            if parent is None:
                continue
            if base == OPAQUE_MARKER:
                opaque.append(parent)
                continue
            if base.startswith(WHITEOUT_PREFIX):
                if base[len(WHITEOUT_PREFIX):] in (".", ".."):
                    self._reject(e.name, "a whiteout of '.' or '..'")
                else:
                    whiteouts.append((parent, base[len(WHITEOUT_PREFIX):], e))
                continue
            node = self._node_for(e)
            if node is None:
                continue
            old = parent.children.get(base)
            if old is not None and old.is_dir and node.is_dir:
                # tar semantics: a repeated directory updates metadata, keeps contents
                self._apply_meta(old, e)
                continue
            if old is not None:
                self._unlink(old)
                dirs.clear()
                dirs[""] = self.root
            parent.children[base] = node
        for parent, name, e in whiteouts:
            # a real entry of the same name in this layer wins over its whiteout; the whiteout
            # keeps its tar entry's owner and time, as every other entry does
            if name and name not in parent.children:
                parent.children[name] = self._new_node(stat.S_IFCHR, uid=e.uid, gid=e.gid, mtime=e.mtime,
                                                       mtime_nsec=e.mtime_nsec, rdev=0)
        for d in opaque:
            d.xattrs = {**d.xattrs, **OPAQUE_XATTRS}
        self._count_dir_links(self.root)

    def _apply_meta(self, node: Node, e: T.Entry) -> None:
        node.mode = stat.S_IFMT(node.mode) | (e.mode & 0o7777)
        node.uid, node.gid, node.mtime, node.mtime_nsec = e.uid, e.gid, e.mtime, e.mtime_nsec
        node.xattrs = dict(e.xattrs) if e.xattrs else NO_XATTRS

    def _check_presentable(self, e: T.Entry) -> None:
        """Names reach the kernel as UTF-8 bytes (bytes that were not UTF-8 carried through as
        surrogate escapes) and xattr values as the bytes they are. A name no bytes can stand for
        (a lone surrogate escaped in the TOC's JSON) declines the layer rather than serve it wrong."""
        for text in (e.name, e.linkname, *e.xattrs):
            try:
                text.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                self.unservable.append(f"{e.name!r}: name {text!r} cannot be encoded")
                return

    def _unlink(self, old: Node) -> None:
        """A name is replaced: its node, and everything below it if a directory, loses that name.

        Link counts stay exact, and a later hard link cannot reach what is gone
        (hard links resolve against the tree as built so far, not by name).
        """
        stack = [old]
        while stack:
            node = stack.pop()
            if node.is_dir:
                stack.extend(node.children.values())
            else:
                node.nlink -= 1

    def _node_for(self, e: T.Entry) -> Node | None:
        if e.xattrs or not (e.name.isascii() and e.linkname.isascii()):  # else trivially presentable
            self._check_presentable(e)
        if e.type == T.HARDLINK:
            target = self.lookup(e.linkname.split("/")) if e.linkname else self.root
            if target is None:
                self._reject(e.name, f"hard link to {e.linkname!r}, which is not an earlier entry")
                return None
            if target.is_dir:
                self._reject(e.name, "hard link to a directory")
                return None
            target.nlink += 1
            return target
        bits = _TYPE_BITS.get(e.type)
        if bits is None:
            self._reject(e.name, f"unknown entry type {e.type!r}")
            return None
        # One constructor call per type, with everything known up front, is most of what
        # building a large tree costs, so nodes are not created and then patched.
        mode, xattrs = bits | (e.mode & 0o7777), dict(e.xattrs) if e.xattrs else NO_XATTRS
        if e.type == T.REG:
            self.file_count += 1
            chunks = e.chunks if self._consume else list(e.chunks)  # a consumed entry's list is ours
            offsets = ONE_CHUNK if len(chunks) == 1 and chunks[0].offset == 0 else tuple(c.offset for c in chunks)
            return Node(self._take_ino(), mode, e.uid, e.gid, e.size, e.mtime, xattrs=xattrs,
                        chunks=chunks, chunk_offsets=offsets, mtime_nsec=e.mtime_nsec)
        if e.type == T.DIR:
            return Node(self._take_ino(), mode, e.uid, e.gid, DIR_SIZE, e.mtime, xattrs=xattrs, children={},
                        mtime_nsec=e.mtime_nsec)
        if e.type == T.SYMLINK:
            return Node(self._take_ino(), mode, e.uid, e.gid, len(e.linkname.encode("utf-8", "surrogateescape")),
                        e.mtime, xattrs=xattrs, target=e.linkname, mtime_nsec=e.mtime_nsec)
        rdev = os.makedev(e.devmajor, e.devminor) if e.type in (T.CHAR, T.BLOCK) else 0
        return Node(self._take_ino(), mode, e.uid, e.gid, 0, e.mtime, xattrs=xattrs, rdev=rdev,
                    mtime_nsec=e.mtime_nsec)

    def _count_dir_links(self, root: Node) -> None:
        root.size = DIR_SIZE
        stack = [root]
        while stack:
            d = stack.pop()
            subdirs = [c for c in d.children.values() if c.children is not None]
            d.nlink = 2 + len(subdirs)
            stack.extend(subdirs)

    # ---- queries ------------------------------------------------------------------
    def lookup(self, parts: list[str]) -> Node | None:
        """The node at ``parts`` below the root, or None. Never follows symlinks."""
        node = self.root
        for part in parts:
            if node.children is None:
                return None
            node = node.children.get(part)
            if node is None:
                return None
        return node

    def find(self, ino: int) -> tuple[Node, str, Node] | None:
        """The node with inode number ``ino``, its path (one of them, for a hard link) and directory.

        For node ids the kernel kept across a restart of the store: it asks by
        number, never by name. The index is built on the first call only.
        """
        if self._by_ino is None:
            index = {self.root.ino: (self.root, "", self.root)}
            stack = [(self.root, "")]
            while stack:
                node, path = stack.pop()
                for name, child in node.children.items():
                    child_path = f"{path}/{name}" if path else name
                    index.setdefault(child.ino, (child, child_path, node))
                    if child.children is not None:
                        stack.append((child, child_path))
            self._by_ino = index
        return self._by_ino.get(ino)

    def chunks(self) -> list[T.Chunk]:
        """Every chunk of every regular file, once (hard links share theirs)."""
        out, seen = [], set()
        for node in self._nodes():
            if node.chunks and node.ino not in seen:
                seen.add(node.ino)
                out.extend(node.chunks)
        return out

    @property
    def max_ino(self) -> int:
        return self._next_ino - 1


def _consumed(entries: list[T.Entry]) -> Iterator[T.Entry]:
    """``entries`` one by one, each dropped from the list as it is handed out."""
    for i in range(len(entries)):
        e, entries[i] = entries[i], None  # type: ignore[call-overload]
        yield e
