"""Writing the seekable index of an ordinary gzip layer (the format gzindex.py reads).

Where a deflate stream can be resumed is known only to an inflater that
reports its block boundaries, which Python's zlib does not: ``indexed_gzip``
(zran's seek points, a small wheel, one thread) finds them. It needs a
seekable file, because it seeks back to its last point while it builds, so
the layer is read from a file on disk (``als index`` downloads each layer
into a temporary file, verified against its digest).

Everything else is computed in one pass over the layer, span by span, through
the very function the store inflates spans with (``gzindex.inflate_span``),
from the checkpoint and the window the index will carry: an index that this
writer emits has had every one of its checkpoints resumed once. The tar
stream of those spans is read for its entries (in the eStargz TOC
vocabulary, plus each file's offset in the uncompressed stream) and their
digests, cut where the spans are cut. Memory is one span and the entries'
JSON objects, whatever the layer's size.
"""

from __future__ import annotations

import base64
import bisect
import gzip
import hashlib
import io
import json
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

from als.errors import FormatError
from als.formats import gzindex, toc
from als.formats.tocentries import MAX_TOC_ENTRIES, tar_header_and_entry

_PIECE = 1 << 20  # file bytes hashed at a time
_GZIDX = struct.Struct("<5sBBQQIII")  # zran's export header: magic, version, flags, sizes, spacing, window, points
_POINT = struct.Struct("<QQB")  # compressed offset, uncompressed offset, bits


@dataclass(frozen=True)
class SeekPoint:
    offset: int  # the byte holding the span's first bit
    bit: int
    uncompressed_offset: int


def seek_points(path: str, span_size: int) -> tuple[list[SeekPoint], int]:
    """The checkpoints ``indexed_gzip`` finds about every ``span_size`` uncompressed bytes, and the stream's size.

    zran records a point as the byte after the one holding its first bits
    and the number of bits left in that byte; ours name that byte and the bit
    where the span starts.
    """
    import indexed_gzip  # only `als index` needs it; the store serves without it

    if not 0 < span_size <= gzindex.MAX_SPAN:
        raise FormatError(f"span size {span_size} is not in [1, {gzindex.MAX_SPAN}]")
    exported = path + ".gzidx"  # on disk, beside the layer: its windows are 32 KiB a point
    try:
        with indexed_gzip.IndexedGzipFile(filename=path, spacing=span_size, window_size=gzindex.WINDOW,
                                          readbuf_size=1 << 20) as f:
            f.build_full_index()
            f.export_index(filename=exported)
        with open(exported, "rb") as f:
            head = f.read(_GZIDX.size)
            magic, version, _flags, _csize, usize, _spacing, _window, count = _GZIDX.unpack_from(head)
            if magic != b"GZIDX" or version not in (0, 1):
                raise FormatError(f"indexed_gzip exported an index of unknown version {version}")
            raw = head + f.read(count * (_POINT.size + 1))  # the points come before the windows
    except (indexed_gzip.ZranError, OSError, ValueError, struct.error) as e:
        raise FormatError(f"the layer cannot be indexed as gzip: {e}") from None
    finally:
        if os.path.exists(exported):
            os.unlink(exported)
    pos = _GZIDX.size
    points: list[SeekPoint] = []
    for _ in range(count):
        c, u, bits = _POINT.unpack_from(raw, pos)
        pos += _POINT.size + (1 if version >= 1 else 0)
        if u >= usize and usize:
            continue  # a point at the very end starts no span
        point = SeekPoint(c - 1, 8 - bits, u) if bits else SeekPoint(c, 0, u)
        if points and point.uncompressed_offset <= points[-1].uncompressed_offset:
            continue
        points.append(point)
    return points, usize


def _spans(blob: BinaryIO, points: list[SeekPoint], size: int, usize: int) -> Iterator[tuple[bytes, bytes]]:
    """Each span's bytes, inflated from its checkpoint, and the window the index will carry for it."""
    window = b""
    crc = 0
    for i, p in enumerate(points):
        last = i + 1 == len(points)
        end = size if last else points[i + 1].offset + (1 if points[i + 1].bit else 0)
        u_end = usize if last else points[i + 1].uncompressed_offset
        if u_end - p.uncompressed_offset > gzindex.MAX_SPAN:
            raise FormatError(f"a span of {u_end - p.uncompressed_offset} bytes at uncompressed offset "
                              f"{p.uncompressed_offset}: the layer has no checkpoint within {gzindex.MAX_SPAN} bytes")
        blob.seek(p.offset)
        data = blob.read(end - p.offset)
        out = gzindex.inflate_span(data, p.bit, window, u_end - p.uncompressed_offset)
        crc = zlib.crc32(out, crc)
        if last:
            _check_end(data, p.bit, window, len(out), crc, usize)
        yield out, window
        window = (window + out[-gzindex.WINDOW:])[-gzindex.WINDOW:]


def _check_end(data: bytes, bit: int, window: bytes, size: int, crc: int, usize: int) -> None:
    """The last span must end the deflate stream, followed by the gzip trailer and nothing else.

    A second gzip member (concatenated gzip) would be cut off by an index of
    the first one: such layers are refused.
    """
    d = zlib.decompressobj(-15, zdict=window) if window else zlib.decompressobj(-15)
    d.decompress(gzindex.resume_stream(data, bit), size + 1)
    if not d.eof or len(d.unused_data) != 8:
        raise FormatError("the layer is not a single gzip member (concatenated members cannot be indexed)")
    want_crc, want_size = struct.unpack("<II", data[-8:])
    if want_crc != crc or want_size != usize & 0xFFFFFFFF:
        raise FormatError("the layer's gzip trailer does not match its data (is it a single gzip member?)")


def _pack(window: bytes) -> str:
    """A window as the index carries it: raw deflate (a window is 32 KiB of the layer: it compresses), base64."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return base64.b64encode(c.compress(window) + c.flush()).decode("ascii")


class _Stream(io.RawIOBase):
    """The spans as one readable stream, for tarfile; counts what was read."""

    def __init__(self, spans: Iterator[bytes]):
        self._spans = spans
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            nxt = next(self._spans, None)
            if nxt is None:
                return 0
            self._buf = memoryview(nxt)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _file_entry(tf: tarfile.TarFile, info: tarfile.TarInfo, entry: dict, starts: list[int]) -> None:
    """Add a regular file's offset and digests (whole, and per span it crosses) to its entry."""
    start, size = info.offset_data, info.size
    entry["offset"] = start
    f = tf.extractfile(info)
    whole = hashlib.sha256()
    pieces: list[str] = []
    position = start
    while position < start + size:
        i = bisect.bisect_right(starts, position) - 1
        piece_end = min(start + size, starts[i + 1] if i + 1 < len(starts) else start + size)
        h = hashlib.sha256()
        while position < piece_end:
            data = f.read(min(_PIECE, piece_end - position))
            if not data:
                raise FormatError(f"tar entry {info.name!r:.300} ends before its {size} bytes")
            h.update(data)
            whole.update(data)
            position += len(data)
        pieces.append("sha256:" + h.hexdigest())
    entry["digest"] = "sha256:" + whole.hexdigest()
    if len(pieces) > 1:
        entry["chunkDigests"] = pieces


def write_index(path: str, *, layer_digest: str, layer_size: int,
                span_size: int = gzindex.DEFAULT_SPAN, progress: Callable[[int], None] | None = None) -> bytes:
    """The index blob of the gzip layer in file ``path``.

    ``layer_digest`` and ``layer_size`` are the layer's, as its manifest
    names it (the index is bound to them, and to the DiffID it computes).
    ``progress`` hears the compressed bytes of each span as it is done. A layer that is not one gzip member
    holding a tar stream raises FormatError.
    """
    if os.path.getsize(path) != layer_size:
        raise FormatError(f"the layer file is {os.path.getsize(path)} bytes, not {layer_size}")
    points, usize = seek_points(path, span_size)
    if not points and usize:
        raise FormatError("indexed_gzip found no checkpoint in the layer")
    starts = [p.uncompressed_offset for p in points]
    checkpoints: list[dict] = []
    diff = hashlib.sha256()  # the tar stream's digest: the config's DiffID of this layer

    def spans() -> Iterator[bytes]:
        done = 0
        for i, (out, window) in enumerate(_spans(blob, points, layer_size, usize)):
            p = points[i]
            checkpoints.append({"offset": p.offset, "bit": p.bit, "uncompressedOffset": p.uncompressed_offset,
                                "digest": "sha256:" + hashlib.sha256(out).hexdigest(), "window": _pack(window)})
            diff.update(out)
            if progress is not None:
                nxt = points[i + 1].offset if i + 1 < len(points) else layer_size
                progress(nxt - done)
                done = nxt
            yield out

    with open(path, "rb") as blob:
        stream = _Stream(spans())
        entries = _entries(stream, starts)
    if len(checkpoints) != len(points):
        raise FormatError(f"inflated {len(checkpoints)} of the layer's {len(points)} spans")
    layer = {"digest": layer_digest, "size": layer_size, "diffID": "sha256:" + diff.hexdigest()}
    doc = {"version": gzindex.VERSION, "layer": layer,
           "uncompressedSize": usize, "spanSize": span_size, "checkpoints": checkpoints, "entries": entries}
    return gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), compresslevel=9, mtime=0)


def _entries(stream: _Stream, starts: list[int]) -> list[dict]:
    """The tar stream's entries, as JSON objects; reads ``stream`` to its end."""
    entries: list[dict] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape") as tf:
            for info in tf:
                if info.issparse():
                    raise FormatError(f"tar entry {info.name!r:.300} is a sparse file, which cannot be indexed")
                kind, _header, entry, size = tar_header_and_entry(info)
                if kind == toc.REG and size:
                    _file_entry(tf, info, entry, starts)
                entries.append(entry)
                if len(entries) > MAX_TOC_ENTRIES:
                    raise FormatError(f"the layer has more than {MAX_TOC_ENTRIES} entries")
    except tarfile.TarError as e:
        raise FormatError(f"the layer is not a tar stream: {e}") from None
    while stream.read(_PIECE):  # the end-of-archive blocks and padding: every span is inflated and hashed
        pass
    return entries
