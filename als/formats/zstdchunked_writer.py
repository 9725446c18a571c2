"""zstd:chunked writing: a tar stream in, a zstd:chunked blob, its digests and annotations out.

Every regular file's chunk is a zstd frame of its own, then the TOC
(compressed, in a skippable frame) and Podman 4.3.1's 40-byte footer; no
tar-split is written (als/formats/zstdchunked.py says why, and has the reader).
"""

from __future__ import annotations

import hashlib
import json
import struct
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Sequence

import zstandard

from als.digest import sha256_digest
from als.errors import FormatError
from als.formats import toc
from als.formats.reorder import reordered_members, skipped
from als.formats.tocentries import CHUNK, copy_chunk, tar_header_and_entry
from als.formats.zstdchunked import (CHECKSUM_ANNOTATION, MANIFEST_TYPE_CRFS, OLD_CHECKSUM_ANNOTATION,
                                     OLD_FOOTER_MAGIC, OLD_POSITION_ANNOTATION, POSITION_ANNOTATION,
                                     SKIPPABLE_MAGIC, UNCOMPRESSED_SIZE_ANNOTATION)

_BLOCK = tarfile.BLOCKSIZE


@dataclass(slots=True)
class WriteResult:
    """What a manifest needs to describe the written layer."""

    toc_digest: str  # the manifest checksum (sha256 of the compressed TOC)
    manifest_position: str  # "offset:length:uncompressed length:1"
    diff_id: str
    uncompressed_size: int
    compressed_size: int
    blob_digest: str

    def annotations(self) -> dict[str, str]:
        """Both spellings (Podman >= 5.1 reads only the current one, 4.3.1 only the old one) and the size."""
        return {CHECKSUM_ANNOTATION: self.toc_digest, POSITION_ANNOTATION: self.manifest_position,
                OLD_CHECKSUM_ANNOTATION: self.toc_digest, OLD_POSITION_ANNOTATION: self.manifest_position,
                UNCOMPRESSED_SIZE_ANNOTATION: str(self.uncompressed_size)}


class _FrameWriter:
    """Writes zstd frames to a non-seekable stream, counting offsets and hashing both sides."""

    def __init__(self, out: BinaryIO, level: int) -> None:
        self._out = out
        self._cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
        self._z = None
        self.offset = 0
        self.size = 0
        self._compressed = hashlib.sha256()
        self._uncompressed = hashlib.sha256()

    def _emit(self, data: bytes) -> None:
        if data:
            self._out.write(data)
            self._compressed.update(data)
            self.offset += len(data)

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._z is None:
            self._z = self._cctx.compressobj()
        self._uncompressed.update(data)
        self.size += len(data)
        self._emit(self._z.compress(data))

    def end_frame(self) -> int:
        """Close the open frame (if any); return the offset where the next one starts."""
        if self._z is not None:
            self._emit(self._z.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
            self._z = None
        return self.offset

    def write_skippable(self, payload: bytes) -> int:
        """Append a skippable frame; return the offset of its payload."""
        self.end_frame()
        self._emit(struct.pack("<II", SKIPPABLE_MAGIC, len(payload)))
        start = self.offset
        self._emit(payload)
        return start

    def digests(self) -> tuple[str, str]:
        return "sha256:" + self._uncompressed.hexdigest(), "sha256:" + self._compressed.hexdigest()


class _Writer:
    def __init__(self, out: BinaryIO, chunk_size: int, level: int) -> None:
        self._z = _FrameWriter(out, level)
        self._chunk_size = chunk_size
        self._level = level
        self._entries: list[dict] = []

    def add(self, info: tarfile.TarInfo, payload: BinaryIO | None) -> None:
        kind, header, entry, size = tar_header_and_entry(info)
        self._z.write(header)
        self._entries.append(entry)
        if kind == toc.REG and size:
            self._write_payload(entry, payload, size)

    def _write_payload(self, entry: dict, payload: BinaryIO | None, size: int) -> None:
        """One frame per chunk holding exactly the chunk's bytes; the padding goes with the next header."""
        whole = hashlib.sha256()
        position = 0
        first = True
        while position < size:
            length = min(self._chunk_size, size - position)
            start = self._z.end_frame()
            digest = copy_chunk(payload, length, self._z.write, whole, entry["name"], size)
            end = self._z.end_frame()
            fields = {"offset": start, "endOffset": end, "chunkSize": length, "chunkOffset": position,
                      "chunkDigest": digest}
            if first:
                entry.update(fields)
                first = False
            else:
                self._entries.append({"type": CHUNK, "name": entry["name"], **fields})
            position += length
        entry["endOffset"] = end  # the file's own entry spans all of its chunks, as Podman writes it
        entry["digest"] = "sha256:" + whole.hexdigest()
        self._z.write(bytes(-size % _BLOCK))

    def finish(self) -> WriteResult:
        self._z.write(bytes(2 * _BLOCK))  # end of archive
        self._z.end_frame()
        manifest = json.dumps({"version": 1, "entries": self._entries}, separators=(",", ":")).encode()
        compressed = zstandard.ZstdCompressor(level=self._level).compress(manifest)
        manifest_offset = self._z.write_skippable(compressed)
        footer = struct.pack("<QQQQ", manifest_offset, len(compressed), len(manifest),
                             MANIFEST_TYPE_CRFS) + OLD_FOOTER_MAGIC
        self._z.write_skippable(footer)
        diff_id, blob_digest = self._z.digests()
        return WriteResult(toc_digest=sha256_digest(compressed),
                           manifest_position=f"{manifest_offset}:{len(compressed)}:{len(manifest)}:{MANIFEST_TYPE_CRFS}",
                           diff_id=diff_id, uncompressed_size=self._z.size, compressed_size=self._z.offset,
                           blob_digest=blob_digest)


def write_zstdchunked(tar_in: BinaryIO, out: BinaryIO, *, chunk_size: int = 4 << 20, level: int = 3,
                      prioritized: Sequence[str] | None = None) -> WriteResult:
    """Convert a tar stream into a zstd:chunked blob on ``out`` (need not be seekable).

    With ``prioritized`` the named files come first (with their parent
    directories), as in eStargz, so a store that prefetches the front of a
    layer gets them; zstd:chunked has no landmark files, so none is written.
    Memory stays bounded: reordering spools payloads to a temporary file.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not 1 <= level <= 22:
        raise ValueError(f"zstd compression level must be in 1..22, got {level}")
    writer = _Writer(out, chunk_size, level)
    try:
        with tarfile.open(fileobj=tar_in, mode="r|*") as tf:
            if not prioritized:
                for info in tf:
                    if not skipped(info):
                        writer.add(info, tf.extractfile(info) if info.isreg() else None)
            else:
                _write_reordered(writer, tf, prioritized)
    except (tarfile.TarError, EOFError) as e:
        raise FormatError(f"input is not a readable tar stream: {e}") from None
    return writer.finish()


def _write_reordered(writer: _Writer, tf: tarfile.TarFile, prioritized: Sequence[str]) -> None:
    for info, payload, _ in reordered_members(tf, prioritized):
        writer.add(info, payload)
