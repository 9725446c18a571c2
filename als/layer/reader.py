"""Reading a layer's files: the read policy between a file system's read and the chunk fetcher.

A read names a byte range of one file. Everything else a lazily pulled layer
decides about it is a choice about layers, not about FUSE, so it lives here
and the file system only translates: what else to fetch along with a miss
(a program or library whole, a small file's small neighbours), telling the
startup predictor that a program runs, recording the file for `als optimize`,
and whether answering would wait on the network at all, which the FUSE
reader threads must know before they start (they never wait).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import partial
from typing import Protocol, Sequence

from cachetools import LRUCache

from als.errors import ALSError, Interrupted
from als.fetch.fetcher import ChunkFetcher
from als.formats import toc as T
from als.layer.access import AccessRecorder
from als.layer.resolved import Layer
from als.layer.startup import Predictor
from als.layer.view import Node

log = logging.getLogger("als.read")

SMALL_FILE = 64 << 10  # a file this small brings the small files after it in its directory on a miss


class Readable(Protocol):
    """What a file system reads bytes through: a layer file here, or a layer's blob (als/store/blob.py)."""

    def ready(self, offset: int, size: int) -> bool:
        """Whether ``read`` of this range would answer without waiting on the network; never waits."""
        ...

    def read(self, offset: int, size: int, cancel: threading.Event | None = None) -> bytes:
        """The bytes, verified; b"" past the end. Raises Interrupted once ``cancel`` is set, else ALSError."""
        ...


def paged_in(node: Node, path: str) -> bool:
    """Programs and shared libraries: mapped and paged in out of order, so worth fetching whole."""
    base = path.rsplit("/", 1)[-1]
    return bool(node.mode & 0o111) or base.endswith(".so") or ".so." in base


class LayerReader:
    """The read policy every file of every layer shares: the fetcher, the recorder, the predictor.

    A file is opened under the name it was found by (``open``): a hard link has
    several, and the name decides whether it is a library and which directory's
    small files come along with it.
    """

    def __init__(self, fetcher: ChunkFetcher, accesses: AccessRecorder, predictor: Predictor | None = None):
        self.fetcher = fetcher
        self.accesses = accesses
        self.predictor = predictor
        self._lock = threading.Lock()
        self._dirs: LRUCache = LRUCache(maxsize=256)  # id(directory node) -> (node, its small files' chunks)

    def open(self, layer: Layer, node: Node, path: str, directory: Node | None = None) -> LayerFile:
        """Regular file ``node`` of ``layer``, found at ``path`` (relative to the layer root) in ``directory``."""
        if paged_in(node, path):
            return LayerFile(self, layer, node, path, whole=node.chunks)
        return LayerFile(self, layer, node, path, directory=directory if node.size <= SMALL_FILE else None)

    def small_files(self, directory: Node) -> list[T.Chunk]:
        """The chunks of a directory's small files in blob order, for read-ahead; kept for recent ones."""
        with self._lock:
            hit = self._dirs.get(id(directory))
        if hit is None:
            chunks = sorted((c for n in directory.children.values() if n.is_reg and n.size <= SMALL_FILE
                             for c in n.chunks), key=lambda c: c.blob_start)
            hit = (directory, chunks)  # the node pins its id while cached
            with self._lock:
                self._dirs[id(directory)] = hit
        return hit[1]


@dataclass(slots=True, eq=False)
class LayerFile:
    """One regular file of a layer as it was found by name, with what reading it fetches on a miss."""

    reader: LayerReader
    layer: Layer
    node: Node
    path: str  # relative to the layer root: what the access record and the logs name
    whole: Sequence[T.Chunk] = ()  # programs and libraries: the whole file comes on a miss
    directory: Node | None = None  # small files: the small files after it in this directory come too

    def ready(self, offset: int, size: int) -> bool:
        return self.reader.fetcher.cached(self.node.chunks_for(offset, size))

    def read(self, offset: int, size: int, cancel: threading.Event | None = None) -> bytes:
        node, layer, reader = self.node, self.layer, self.reader
        chunks = node.chunks_for(offset, size)
        log.debug("image %s layer %s: reading /%s at %d", layer.ref, layer.desc.digest, self.path, offset)
        reader.accesses.record(layer.ref, layer.desc.digest, layer.desc.index, self.path)
        if not chunks:
            return b""
        # A program's loader and libraries come next: predicted once its miss is being fetched. A
        # program found cached (an optimized image's prefetch brought it, or the background fetch)
        # is not read again for its ELF header: what it needs most likely came with it, and
        # reading it would slow the start it serves.
        predict = (partial(reader.predictor.after_exec, layer, node, self.path)
                   if self.whole and reader.predictor is not None else None)
        end = min(offset + size, node.size)
        neighbours = partial(reader.small_files, self.directory) if self.directory is not None else None
        try:
            return reader.fetcher.read_span(layer.source, chunks, offset, end, self.whole, neighbours, cancel=cancel,
                                            on_miss=predict)
        except Interrupted:
            raise
        except ALSError as e:
            log.error("image %s layer %s file /%s: read failed: %s", layer.ref, layer.desc.digest, self.path, e)
            raise
