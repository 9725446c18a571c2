"""The chunk reader: cache first, then one verified fetch per chunk, ever.

A FUSE read becomes a list of chunks. Cached ones are served from the chunk
cache; missing neighbours are fetched together in one range request, each one
decompressed and checked against its digest before anything sees it.
Concurrent readers of the same chunk share one fetch (an in-flight table of
futures), so a burst of reads after a container starts costs one round trip
per region, not one per reader.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable

from als.cache import ChunkCache
from als.digest import sha256_digest
from als.errors import FormatError, RegistryError, VerificationError
from als.formats import estargz
from als.formats import toc as T

log = logging.getLogger("als.fetch")

Decompressor = Callable[[bytes, T.Chunk], bytes]
DECOMPRESSORS: dict[str, Decompressor] = {T.GZIP: estargz.decompress_chunk}


@dataclass(frozen=True)
class BlobSource:
    """Where a layer's compressed bytes come from, and how its chunks are compressed."""

    label: str  # "image <ref> layer <digest>", for log lines
    read_range: Callable[[int, int], bytes]  # [start, end) of the compressed blob
    compression: str = T.GZIP


class ChunkFetcher:
    def __init__(self, cache: ChunkCache, *, coalesce_gap: int = 64 << 10,
                 max_request: int = 16 << 20, wait_timeout: float = 120.0):
        self.cache = cache
        self.coalesce_gap = coalesce_gap
        self.max_request = max_request
        self.wait_timeout = wait_timeout
        self._inflight: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.bytes_fetched = 0

    def read(self, source: BlobSource, chunks: list[T.Chunk]) -> list[bytes]:
        """The verified bytes of each chunk, in order. Raises ALSError subclasses."""
        out: dict[T.Chunk, bytes] = {}
        mine: list[tuple[T.Chunk, Future]] = []
        theirs: list[tuple[T.Chunk, Future]] = []
        for c in chunks:
            if c in out:
                continue
            if c.zeros:
                out[c] = bytes(c.size)
                continue
            data = self.cache.get(c.digest)
            if data is not None:
                out[c] = data
                continue
            with self._lock:
                fut = self._inflight.get(c.digest)
                if fut is None:
                    fut = Future()
                    self._inflight[c.digest] = fut
                    mine.append((c, fut))
                else:
                    theirs.append((c, fut))
        if mine:
            self._fetch(source, mine)
        for c, fut in mine + theirs:
            try:
                out[c] = fut.result(timeout=self.wait_timeout)
            except FutureTimeout:
                raise RegistryError(f"timed out waiting for chunk {c.digest} of {source.label}") from None
        return [out[c] for c in chunks]

    def _fetch(self, source: BlobSource, claimed: list[tuple[T.Chunk, Future]]) -> None:
        claimed.sort(key=lambda cf: cf[0].blob_start)
        for run in self._runs(claimed):
            start, end = run[0][0].blob_start, max(c.blob_end for c, _ in run)
            try:
                data = source.read_range(start, end)
                self.bytes_fetched += len(data)
            except Exception as e:  # every waiter must hear about it
                for c, fut in run:
                    self._finish(c, fut, exc=e)
                continue
            for c, fut in run:
                try:
                    chunk = self._decode(source, c, data[c.blob_start - start:c.blob_end - start])
                except Exception as e:
                    self._finish(c, fut, exc=e)
                else:
                    self.cache.put(c.digest, chunk)
                    self._finish(c, fut, result=chunk)

    def _runs(self, claimed):
        run = [claimed[0]]
        for c, fut in claimed[1:]:
            first, last = run[0][0], run[-1][0]
            if c.blob_start - last.blob_end <= self.coalesce_gap and c.blob_end - first.blob_start <= self.max_request:
                run.append((c, fut))
            else:
                yield run
                run = [(c, fut)]
        yield run

    def _decode(self, source: BlobSource, c: T.Chunk, raw: bytes) -> bytes:
        decompress = DECOMPRESSORS.get(source.compression)
        if decompress is None:
            raise FormatError(f"{source.label}: no decompressor for {source.compression}")
        data = decompress(raw, c)
        if sha256_digest(data) != c.digest:
            raise VerificationError(
                f"{source.label}: chunk at blob offset {c.blob_start} does not match its digest {c.digest}")
        return data

    def _finish(self, c: T.Chunk, fut: Future, *, result: bytes | None = None,
                exc: BaseException | None = None) -> None:
        with self._lock:
            self._inflight.pop(c.digest, None)
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
