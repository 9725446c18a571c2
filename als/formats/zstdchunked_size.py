"""The exact uncompressed size of a zstd:chunked layer, which containers/storage needs as ``diff-size``.

Podman writes no annotation for it. Two ways to get it without reading file
contents: the tar-split (Podman >= 5 writes one), which lists every raw tar
segment and every file's size, in one read; or, for layers without a usable
one (Podman 4.3.1's), the small frames between file ranges, which hold the
tar headers and padding, about one request per thousand files. Like the
reader, this treats every byte as hostile: inflation is always bounded.
"""

from __future__ import annotations

import binascii
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import zstandard

from als.digest import is_sha256, sha256_digest
from als.errors import FormatError, VerificationError
from als.formats import toc
from als.formats.tocentries import COPY_PIECE
from als.formats.zstdchunked import (MAX_WINDOW, TAR_SPLIT_CHECKSUM_ANNOTATION, TAR_SPLIT_POSITION_ANNOTATION,
                                     bounded_decompress)

MAX_TAR_SPLIT = 256 << 20  # largest tar-split inflated (streamed, so this bounds time, not memory)
MAX_TAR_SPLIT_LINE = 16 << 20  # largest single tar-split entry (a tar header with big PAX records)
TAR_SPLIT_FILE = 1  # tar-split entry types: a file's content, by size
TAR_SPLIT_SEGMENT = 2  # raw tar bytes (headers, padding), base64

ReadRange = Callable[[int, int], bytes]

@dataclass(frozen=True, slots=True)
class TarSplitLocation:
    """Where the compressed tar-split is, and the digest that vouches for it."""

    offset: int
    length: int
    uncompressed_length: int
    digest: str  # sha256 of the compressed bytes


def locate_tar_split(annotations: dict, blob_size: int, parsed: toc.TOC, *, max_compressed: int = 64 << 20,
                     max_uncompressed: int = MAX_TAR_SPLIT) -> TarSplitLocation:
    """The tar-split's location from the annotations, checked against the blob and the limits.

    Only a tar-split something vouches for is used: the verified TOC's
    ``tarSplitDigest``, else the older writers' checksum annotation (which
    the manifest carries, like the TOC digest itself).
    """
    position = annotations.get(TAR_SPLIT_POSITION_ANNOTATION)
    if position is None:
        raise FormatError(f"no {TAR_SPLIT_POSITION_ANNOTATION} annotation")
    parts = position.split(":") if isinstance(position, str) else []
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise FormatError(f"annotation {TAR_SPLIT_POSITION_ANNOTATION} is {position!r:.100}, "
                          "not offset:length:size")
    offset, length, size = (int(p) for p in parts)
    if not (parsed.data_end <= offset and 0 < length and offset + length <= blob_size):
        raise FormatError(f"tar-split at [{offset}, {offset + length}) lies outside the {blob_size}-byte blob's "
                          f"metadata after {parsed.data_end}")
    if length > max_compressed or size > max_uncompressed:
        raise FormatError(f"tar-split of {length} bytes ({size} inflated) exceeds the limits "
                          f"({max_compressed} and {max_uncompressed})")
    digest = parsed.tar_split_digest or annotations.get(TAR_SPLIT_CHECKSUM_ANNOTATION, "")
    if not is_sha256(digest):
        raise FormatError("nothing vouches for its tar-split (no tarSplitDigest in the TOC, "
                          f"no {TAR_SPLIT_CHECKSUM_ANNOTATION} annotation)")
    return TarSplitLocation(offset=offset, length=length, uncompressed_length=size, digest=digest)


def tar_split_size(data: bytes, location: TarSplitLocation, *, file_bytes: int | None = None) -> int:
    """The exact length of the layer's tar stream, from its tar-split (the bytes ``location`` names).

    Why: containers/storage needs the exact ``diff-size``, and the tar-split
    lists every raw tar segment (headers, padding, the end of the archive)
    and every file's size, so their sum is the size: one read, against
    about one request per thousand files from the header frames. The digest
    is checked before anything is inflated, the output is streamed and
    bounded by the size the annotation states, and ``file_bytes`` (the
    regular files' sizes from the TOC) must equal what the tar-split lists.
    """
    if len(data) != location.length:
        raise FormatError(f"tar-split is {len(data)} bytes, the annotation says {location.length}")
    digest = sha256_digest(data)
    if digest != location.digest:
        raise VerificationError(f"tar-split digest is {digest}, the TOC or manifest says {location.digest}")
    files = segments = 0
    for n, line in enumerate(_lines(data, location.uncompressed_length), 1):
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise FormatError(f"tar-split entry {n} is not valid JSON: {e}") from None
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind == TAR_SPLIT_FILE:
            size = entry.get("size", 0)
            if type(size) is not int or size < 0:
                raise FormatError(f"tar-split entry {n}: size {size!r:.40} is not a non-negative integer")
            files += size
        elif kind == TAR_SPLIT_SEGMENT:
            payload = entry.get("payload") or ""
            try:
                segments += len(binascii.a2b_base64(payload, strict_mode=True)) if payload else 0
            except (binascii.Error, TypeError, ValueError):
                raise FormatError(f"tar-split entry {n}: payload is not base64") from None
        else:
            raise FormatError(f"tar-split entry {n}: unknown type {kind!r:.40}")
    if file_bytes is not None and files != file_bytes:
        raise FormatError(f"tar-split lists {files} bytes of file content, the TOC {file_bytes}")
    return files + segments


def _lines(data: bytes, expected: int):
    """The newline-separated lines of a zstd stream that must inflate to exactly ``expected`` bytes."""
    try:
        reader = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).stream_reader(
            io.BytesIO(data), read_across_frames=True)
        produced = 0
        pending = bytearray()
        while piece := reader.read(COPY_PIECE):
            produced += len(piece)
            if produced > expected:
                raise FormatError(f"tar-split inflates to more than the {expected} bytes its annotation states")
            pending += piece
            start = 0
            while (end := pending.find(b"\n", start)) >= 0:
                if end > start:
                    yield bytes(pending[start:end])
                start = end + 1
            del pending[:start]
            if len(pending) > MAX_TAR_SPLIT_LINE:
                raise FormatError(f"tar-split entry longer than {MAX_TAR_SPLIT_LINE} bytes")
    except zstandard.ZstdError as e:
        raise FormatError(f"tar-split: corrupt zstd data: {e}") from None
    if produced != expected:
        raise FormatError(f"tar-split inflates to {produced} bytes, its annotation says {expected}")
    if pending:
        yield bytes(pending)


def uncompressed_size(parsed: toc.TOC, read_range: ReadRange, *, max_requests: int = 8192,
                      merge_gap: int = 1 << 10, max_header_bytes: int = 256 << 20, workers: int = 8) -> int:
    """The exact length of the blob's decompressed tar stream, without reading file contents.

    Why: containers/storage needs the exact ``diff-size`` of a layer, and a
    zstd:chunked layer made by Podman carries no annotation for it. File
    contents are known from the TOC (their sizes); everything else (tar
    headers, padding, the end-of-archive blocks) sits in the frames between
    file ranges, which are small: those are fetched and decompressed. Ranges
    separated by less than ``merge_gap`` compressed file bytes are read in one
    request (and decompressed whole). More than ``max_requests`` requests
    raise FormatError rather than stall a lookup.
    """
    spans: list[tuple[int, int, int]] = []  # (blob start, blob end, uncompressed size) of file data
    seen: set[tuple[int, int]] = set()
    for e in parsed.entries:
        for c in e.chunks:
            if (c.blob_start, c.blob_end) not in seen:
                seen.add((c.blob_start, c.blob_end))
                spans.append((c.blob_start, c.blob_end, c.inner_offset + c.size))
    spans.sort()
    # Requests: the gaps between spans, merged over small spans. A span inside
    # a request is decompressed with it; the others count by their size.
    gaps: list[tuple[int, int]] = []
    cursor = 0
    for start, end, _size in spans:
        if start < cursor:
            raise FormatError(f"file data at blob offset {start} overlaps other data")
        if start > cursor:
            gaps.append((cursor, start))
        cursor = end
    if cursor < parsed.data_end:
        gaps.append((cursor, parsed.data_end))
    requests = _merge(gaps, merge_gap)
    if len(requests) > max_requests:
        raise FormatError(f"its uncompressed size is unknown and would take {len(requests)} requests "
                          f"to compute (limit {max_requests})")
    inside = _spans_inside(requests, spans)
    total_file = sum(size for _, _, size in spans) - sum(size for _, _, size in inside)

    def measure(r: tuple[int, int]) -> int:
        data = read_range(*r)
        n = len(bounded_decompress(data, max_header_bytes + 1, f"blob bytes {r[0]}-{r[1] - 1}"))
        if n > max_header_bytes:
            raise FormatError(f"blob bytes {r[0]}-{r[1] - 1} decompress to more than {max_header_bytes} bytes")
        return n

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="als-zstd-size") as pool:
        header_bytes = sum(pool.map(measure, requests))
    return total_file + header_bytes


def _merge(requests: list[tuple[int, int]], merge_gap: int) -> list[tuple[int, int]]:
    """Join consecutive requests whose distance (file data between them) is at most ``merge_gap``."""
    out: list[tuple[int, int]] = []
    for start, end in requests:
        if out and start - out[-1][1] <= merge_gap:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def _spans_inside(requests: list[tuple[int, int]], spans: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    inside = []
    i = 0
    for start, end, size in spans:
        while i < len(requests) and requests[i][1] <= start:
            i += 1
        if i < len(requests) and requests[i][0] <= start and end <= requests[i][1]:
            inside.append((start, end, size))
    return inside
