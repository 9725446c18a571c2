"""eStargz writing: a tar stream in, an eStargz blob and its digests out.

Each regular-file chunk starts a gzip member of its own and the TOC follows
the data in a member of its own, then the footer (als/formats/estargz.py has
the reader and the byte layout's constants). The output need not be seekable,
so offsets and digests are counted as the bytes go by.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Sequence

from als.digest import sha256_digest
from als.errors import FormatError
from als.formats import toc
from als.formats.estargz import (GZIP_WBITS, LANDMARK_CONTENTS, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME,
                                 make_footer)
from als.formats.reorder import reordered_members, skipped
from als.formats.tocentries import (CHUNK, TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION, copy_chunk,
                                    tar_header_and_entry)

_BLOCK = tarfile.BLOCKSIZE
_TAR_EOF = bytes(2 * _BLOCK)


@dataclass(slots=True)
class WriteResult:
    """What a manifest needs to describe the written layer."""

    toc_digest: str  # for the TOC_DIGEST_ANNOTATION
    diff_id: str  # sha256 of the whole uncompressed tar stream we emitted
    uncompressed_size: int  # for the UNCOMPRESSED_SIZE_ANNOTATION
    compressed_size: int
    blob_digest: str  # sha256 of the compressed blob

    def annotations(self) -> dict[str, str]:
        """What the layer's manifest descriptor needs for lazy pulling: the TOC digest and the exact size."""
        return {TOC_DIGEST_ANNOTATION: self.toc_digest, UNCOMPRESSED_SIZE_ANNOTATION: str(self.uncompressed_size)}


class _MemberWriter:
    """Writes gzip members to a non-seekable stream, keeping offsets and digests.

    Offsets are counted here because the output cannot be asked for its
    position; both digests are computed as the bytes go by.
    """

    def __init__(self, out: BinaryIO, level: int) -> None:
        self._out = out
        self._level = level
        self._z = None
        self.offset = 0  # compressed bytes written so far
        self.size = 0  # uncompressed bytes written so far
        self._compressed = hashlib.sha256()
        self._uncompressed = hashlib.sha256()

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        view = memoryview(data)
        while view:
            n = self._out.write(view)
            # Raw streams may write less; None from a file-like object means "all".
            view = view[len(view) if n is None else n :]
        self._compressed.update(data)
        self.offset += len(data)

    def write(self, data: bytes) -> None:
        """Append uncompressed bytes to the open member (opening one if needed)."""
        if self._z is None:
            self._z = zlib.compressobj(self._level, zlib.DEFLATED, GZIP_WBITS)
        self._uncompressed.update(data)
        self.size += len(data)
        self._emit(self._z.compress(data))

    def close_member(self) -> None:
        if self._z is not None:
            self._emit(self._z.flush())
            self._z = None

    def new_member(self) -> int:
        """Close the open member and start another; return its compressed offset."""
        self.close_member()
        self._z = zlib.compressobj(self._level, zlib.DEFLATED, GZIP_WBITS)
        return self.offset

    def write_raw(self, data: bytes) -> None:
        """Append already-compressed bytes (the footer) after closing the member."""
        self.close_member()
        self._emit(data)

    def digests(self) -> tuple[str, str]:
        return (
            "sha256:" + self._uncompressed.hexdigest(),
            "sha256:" + self._compressed.hexdigest(),
        )


@dataclass(frozen=True, slots=True)
class _WrittenChunk:
    offset: int  # compressed offset of the member holding the chunk
    file_offset: int
    size: int
    digest: str


class _Writer:
    """Emits tar entries as eStargz members and collects their TOC entries."""

    def __init__(self, out: BinaryIO, chunk_size: int, level: int) -> None:
        self._gz = _MemberWriter(out, level)
        self._chunk_size = chunk_size
        self._entries: list[dict] = []

    def add(self, info: tarfile.TarInfo, payload: BinaryIO | None) -> None:
        """Write one entry; ``payload`` supplies ``info.size`` bytes for a regular file."""
        kind, header, entry, size = tar_header_and_entry(info)
        self._gz.write(header)
        self._entries.append(entry)
        if kind == toc.REG:
            self._write_payload(entry, payload, size)

    def _write_payload(self, entry: dict, payload: BinaryIO | None, size: int) -> None:
        """Write the file content, one gzip member per chunk, and fill the TOC."""
        whole = hashlib.sha256()
        chunks: list[_WrittenChunk] = []
        position = 0
        while position < size:
            length = min(self._chunk_size, size - position)
            offset = self._gz.new_member()
            digest = copy_chunk(payload, length, self._gz.write, whole, entry["name"], size)
            chunks.append(_WrittenChunk(offset, position, length, digest))
            position += length
        self._gz.write(bytes(-size % _BLOCK))
        entry["digest"] = "sha256:" + whole.hexdigest()
        for i, chunk in enumerate(chunks):
            # chunkSize is left out of the last chunk: 0 means "to the end of the file".
            last = i == len(chunks) - 1
            if i == 0:
                entry["offset"] = chunk.offset
                if not last:
                    entry["chunkSize"] = chunk.size
                entry["chunkDigest"] = chunk.digest
                continue
            item = {"name": entry["name"], "type": CHUNK, "offset": chunk.offset, "chunkOffset": chunk.file_offset}
            if not last:
                item["chunkSize"] = chunk.size
            item["chunkDigest"] = chunk.digest
            self._entries.append(item)

    def add_landmark(self, name: str) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(LANDMARK_CONTENTS)
        info.mode = 0o644
        self.add(info, io.BytesIO(LANDMARK_CONTENTS))

    def finish(self) -> WriteResult:
        """Write the TOC member and the footer; return the layer's digests."""
        toc_json = json.dumps({"version": 1, "entries": self._entries}, indent="\t").encode("ascii")
        toc_offset = self._gz.new_member()
        info = tarfile.TarInfo(TOC_NAME)
        info.size = len(toc_json)
        info.mode = 0
        self._gz.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        self._gz.write(toc_json)
        self._gz.write(bytes(-len(toc_json) % _BLOCK) + _TAR_EOF)
        self._gz.write_raw(make_footer(toc_offset))
        diff_id, blob_digest = self._gz.digests()
        return WriteResult(
            toc_digest=sha256_digest(toc_json),
            diff_id=diff_id,
            uncompressed_size=self._gz.size,
            compressed_size=self._gz.offset,
            blob_digest=blob_digest,
        )


def write_estargz(
    tar_in: BinaryIO,
    out: BinaryIO,
    *,
    chunk_size: int = 4 << 20,
    level: int = 9,
    prioritized: Sequence[str] | None = None,
) -> WriteResult:
    """Convert a tar stream (plain or compressed) into an eStargz blob on ``out``.

    ``out`` need not be seekable. Without ``prioritized`` the input is streamed
    straight through behind a ``.no.prefetch.landmark``. With it, entries must
    be reordered, so file payloads are spooled to a temporary file first and
    memory stays bounded by the entry count, not the layer size.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not -1 <= level <= 9:
        raise ValueError(f"compression level must be in -1..9, got {level}")
    writer = _Writer(out, chunk_size, level)
    try:
        with tarfile.open(fileobj=tar_in, mode="r|*") as tf:
            if not prioritized:
                writer.add_landmark(NO_PREFETCH_LANDMARK)
                for info in tf:
                    if not skipped(info):
                        writer.add(info, tf.extractfile(info) if info.isreg() else None)
            else:
                _write_reordered(writer, tf, prioritized)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise FormatError(f"input is not a readable tar stream: {e}") from None
    return writer.finish()


def _write_reordered(writer: _Writer, tf: tarfile.TarFile, prioritized: Sequence[str]) -> None:
    """Prioritized files, then `.prefetch.landmark`, then the rest; `.no.prefetch.landmark`
    first instead when none of the prioritized files exist."""
    any_prioritized = None  # decided by the first entry
    landmark_written = False
    for info, payload, first in reordered_members(tf, prioritized):
        if any_prioritized is None:
            any_prioritized = first
            if not first:
                writer.add_landmark(NO_PREFETCH_LANDMARK)
                landmark_written = True
        if not first and not landmark_written:
            writer.add_landmark(PREFETCH_LANDMARK)
            landmark_written = True
        writer.add(info, payload)
    if not landmark_written:
        writer.add_landmark(PREFETCH_LANDMARK if any_prioritized else NO_PREFETCH_LANDMARK)
