"""zstd:chunked: locating and verifying its TOC, decompressing its chunks, and writing it.

A zstd:chunked blob is a run of zstd frames whose decompressed concatenation
is the layer's tar stream; every regular file's content starts a frame of its
own (one per chunk), so a byte range of the blob decompresses on its own. The
TOC ("manifest") is zstd-compressed inside a skippable frame after the data,
and the layer annotations say where it is and vouch for it: the
``manifest-checksum`` is the sha256 of its *compressed* bytes. Writers since
containers/storage 1.47 add a second skippable frame, the *tar-split*: the
tar stream's headers and padding as JSON lines, with each file's size, which
gives the exact uncompressed size in one read. See docs/formats.md
for the byte layout.

Two spellings of the annotations exist: ``io.github.containers.zstd-chunked.*``
(containers/storage >= 1.44) and ``io.containers.zstd-chunked.*`` (what
Podman 4.3.1 writes); both are read. Podman >= 5.1 asks an additional layer
store only about layers with the current ``manifest-checksum`` name, and
Podman 4.3.1's own partial pulls read only the old names, so the writer puts
both on each layer (neither version reads the other's). It writes what
Podman 4.3.1 writes otherwise (40-byte footer, no tar-split: Podman >= 5 then
pulls such a layer whole when no store serves it, as it does eStargz), plus
the uncompressed-size annotation that the store needs for an exact
``diff-size``.

Like the eStargz reader, the reader is pure (the caller fetches bytes) and
treats every byte as hostile: decompression is always bounded.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import json
import struct
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Callable, Sequence

import zstandard

from als.digest import is_sha256, sha256_digest
from als.errors import FormatError, VerificationError
from als.oci import OCI_LAYER_ZSTD
from als.formats import estargz
from als.formats import toc

MEDIA_TYPE = OCI_LAYER_ZSTD
_PREFIXES = ("io.github.containers.zstd-chunked.", "io.containers.zstd-chunked.")
CHECKSUM_ANNOTATIONS = tuple(p + "manifest-checksum" for p in _PREFIXES)
POSITION_ANNOTATIONS = tuple(p + "manifest-position" for p in _PREFIXES)
CHECKSUM_ANNOTATION, OLD_CHECKSUM_ANNOTATION = CHECKSUM_ANNOTATIONS
POSITION_ANNOTATION, OLD_POSITION_ANNOTATION = POSITION_ANNOTATIONS
TAR_SPLIT_POSITION_ANNOTATION = _PREFIXES[0] + "tarsplit-position"  # "offset:length:uncompressed length"
# Older writers vouched for the tar-split with this annotation; newer ones with the TOC's "tarSplitDigest".
TAR_SPLIT_CHECKSUM_ANNOTATION = _PREFIXES[0] + "tarsplit-checksum"
UNCOMPRESSED_SIZE_ANNOTATION = estargz.UNCOMPRESSED_SIZE_ANNOTATION

MANIFEST_TYPE_CRFS = 1
SKIPPABLE_MAGIC = 0x184D2A50  # the first of the 16 skippable-frame magics
_SKIPPABLE_HEADER = 8
OLD_FOOTER_MAGIC = b"GnUlInUx"
CHUNK_ZEROS = "zeros"
MAX_WINDOW = 1 << 27  # largest zstd window accepted (128 MiB, zstd's own default limit)
_COPY_PIECE = 1 << 20
_BLOCK = tarfile.BLOCKSIZE
MAX_TAR_SPLIT = 256 << 20  # largest tar-split inflated (streamed, so this bounds time, not memory)
MAX_TAR_SPLIT_LINE = 16 << 20  # largest single tar-split entry (a tar header with big PAX records)
TAR_SPLIT_FILE = 1  # tar-split entry types: a file's content, by size
TAR_SPLIT_SEGMENT = 2  # raw tar bytes (headers, padding), base64

ReadRange = Callable[[int, int], bytes]


# --------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManifestLocation:
    """Where the compressed TOC is and what vouches for it, from the layer annotations."""

    checksum: str  # sha256 of the compressed TOC bytes: the layer's TOC digest
    offset: int  # blob offset of the compressed TOC (after its skippable-frame header)
    length: int  # compressed length
    uncompressed_length: int

    @property
    def data_end(self) -> int:
        """Where file data ends: the skippable frame holding the TOC starts here."""
        return self.offset - _SKIPPABLE_HEADER


def is_zstd_chunked(annotations: dict) -> bool:
    """Whether the annotations claim a zstd:chunked TOC (either spelling)."""
    return any(k in annotations for k in CHECKSUM_ANNOTATIONS + POSITION_ANNOTATIONS)


def with_current_names(annotations: dict) -> dict:
    """The annotations, with the current spelling added where a layer has only the old one.

    Why: Podman >= 5.1 asks an additional layer store only about layers with
    the current ``manifest-checksum`` name, so a layer that Podman 4.3.1 (or
    an older ``als convert``) wrote is pulled whole there. Both spellings mean
    the same bytes, so adding the current one in the manifest makes such a
    layer lazy without touching the blob.
    """
    out = dict(annotations)
    # Never next to an eStargz TOC digest: Podman >= 5.1 refuses a layer that has both.
    if (CHECKSUM_ANNOTATION in out or OLD_CHECKSUM_ANNOTATION not in out
            or estargz.TOC_DIGEST_ANNOTATION in out):
        return out
    for new, old in ((CHECKSUM_ANNOTATION, OLD_CHECKSUM_ANNOTATION), (POSITION_ANNOTATION, OLD_POSITION_ANNOTATION)):
        if old in out:
            out[new] = out[old]
    return out


def locate(annotations: dict, blob_size: int, *, max_toc_size: int = 64 << 20) -> ManifestLocation:
    """The TOC's location from the layer annotations, checked against the blob size.

    The current annotation names win over the old ones; checksum and position
    must come from the same spelling, as one writer wrote them together.
    """
    for checksum_key, position_key in zip(CHECKSUM_ANNOTATIONS, POSITION_ANNOTATIONS):
        if checksum_key in annotations or position_key in annotations:
            break
    else:
        raise FormatError("no zstd:chunked manifest-checksum and manifest-position annotations")
    checksum = annotations.get(checksum_key, "")
    position = annotations.get(position_key, "")
    if not is_sha256(checksum):
        raise FormatError(f"annotation {checksum_key} is {checksum!r:.100}, not a sha256 digest")
    parts = position.split(":")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise FormatError(f"annotation {position_key} is {position!r:.100}, not offset:length:size:type")
    offset, length, size, kind = (int(p) for p in parts)
    if kind != MANIFEST_TYPE_CRFS:
        raise FormatError(f"zstd:chunked manifest type {kind} is not supported (want {MANIFEST_TYPE_CRFS})")
    if not (_SKIPPABLE_HEADER <= offset and 0 < length and offset + length <= blob_size):
        raise FormatError(f"zstd:chunked manifest at [{offset}, {offset + length}) lies outside "
                          f"the {blob_size}-byte blob")
    if length > max_toc_size or size > max_toc_size:
        raise FormatError(f"zstd:chunked manifest of {max(length, size)} bytes exceeds the limit of {max_toc_size}")
    return ManifestLocation(checksum=checksum, offset=offset, length=length, uncompressed_length=size)


def _bounded_decompress(data: bytes, limit: int, what: str) -> bytes:
    """Decompress the zstd frames in ``data`` (skippable frames are skipped), at most ``limit`` bytes."""
    try:
        reader = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).stream_reader(
            io.BytesIO(data), read_across_frames=True)
        out = bytearray()
        while len(out) < limit:
            piece = reader.read(min(limit - len(out), _COPY_PIECE))
            if not piece:
                break
            out += piece
        return bytes(out)
    except zstandard.ZstdError as e:
        raise FormatError(f"{what}: corrupt zstd data: {e}") from None


def parse_manifest(data: bytes, location: ManifestLocation, *,
                   max_entries: int = estargz.MAX_TOC_ENTRIES) -> toc.TOC:
    """Verify, decompress and normalise a zstd:chunked TOC.

    ``data`` is exactly the blob bytes ``[location.offset, location.offset +
    location.length)``. The checksum is over these compressed bytes (as
    containers/storage computes it) and is checked before anything is
    decompressed; the output is bounded by the uncompressed length the
    annotation states; at most ``max_entries`` entries are accepted, as for eStargz.
    """
    if len(data) != location.length:
        raise FormatError(f"zstd:chunked manifest is {len(data)} bytes, the annotation says {location.length}")
    digest = sha256_digest(data)
    if digest != location.checksum:
        raise VerificationError(f"zstd:chunked manifest checksum is {digest}, the manifest says {location.checksum}")
    raw = _bounded_decompress(data, location.uncompressed_length + 1, "zstd:chunked manifest")
    if len(raw) != location.uncompressed_length:
        raise FormatError(f"zstd:chunked manifest decompresses to {len(raw)} bytes, "
                          f"the annotation says {location.uncompressed_length}")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"zstd:chunked manifest is not valid JSON: {e}") from None
    return _normalise(doc, location, max_entries)


def _int(obj: dict, key: str, where: str) -> int:
    value = obj.get(key, 0)
    if type(value) is not int or not 0 <= value < (1 << 63):
        raise FormatError(f"{where}: {key!r} must be a non-negative integer, got {value!r:.80}")
    return value


def _str(obj: dict, key: str, where: str) -> str:
    value = obj.get(key, "")
    if type(value) is not str:
        raise FormatError(f"{where}: {key!r} must be a string, got {value!r:.80}")
    return value


def _normalise(doc: object, location: ManifestLocation, max_entries: int) -> toc.TOC:
    items = toc.entry_list(doc, "zstd:chunked manifest", max_entries)
    entries: list[toc.Entry] = []
    files: list[tuple[toc.Entry, list[dict]]] = []
    current: tuple[toc.Entry, list[dict]] | None = None
    file_name = ""  # the current regular file's name as the TOC spells it
    for i, obj in enumerate(items):
        # The entry vocabulary is eStargz's; its parser checks every shared field.
        get = estargz.checked_fields(obj, i).get
        if get("type") == estargz.CHUNK:
            if current is None:
                raise FormatError(f"TOC entry {i}: chunk entry does not follow a regular file")
            name = get("name", "")
            if name and name != file_name and estargz.clean_name(name) != current[0].name:
                raise FormatError(f"TOC entry {i}: chunk of {name!r:.300} follows {current[0].name!r:.300}")
            current[1].append(obj)
            continue
        entry = estargz.toc_entry(obj, i)
        entries.append(entry)
        current = (entry, [obj]) if entry.type == toc.REG else None
        if current is not None:
            file_name = get("name", "")
            files.append(current)
    for entry, objs in files:
        _attach_chunks(entry, objs, location.data_end)
    tar_split_digest = doc.get("tarSplitDigest", "")
    return toc.TOC(entries=entries, digest=location.checksum, compression=toc.ZSTD, data_end=location.data_end,
                   tar_split_digest=tar_split_digest if isinstance(tar_split_digest, str) else "")


def _attach_chunks(entry: toc.Entry, objs: list[dict], data_end: int) -> None:
    where = f"regular file {entry.name!r:.300}"
    if entry.size == 0:
        if len(objs) > 1:
            raise FormatError(f"{where} is empty but has chunk entries")
        return
    # The regular file's own entry is its first chunk, and its endOffset ends
    # the file's data; each chunk ends where the next one starts (Podman 4.3.1
    # writes no endOffset on chunk entries).
    file_end = _int(objs[0], "endOffset", where)
    chunks = []
    for k, obj in enumerate(objs):
        start = _int(obj, "offset", where)
        end = _int(objs[k + 1], "offset", where) if k + 1 < len(objs) else file_end
        chunk_offset = _int(obj, "chunkOffset", where)
        size = _int(obj, "chunkSize", where)
        if not size:  # the last (or only) chunk runs to the end of the file
            size = (_int(objs[k + 1], "chunkOffset", where) if k + 1 < len(objs) else entry.size) - chunk_offset
        digest = _str(obj, "chunkDigest", where)
        if not digest:
            if len(objs) > 1:
                raise FormatError(f"{where}: chunk at {chunk_offset} has no chunkDigest")
            digest = entry.digest  # one chunk: the whole file's digest vouches for it
        if not is_sha256(digest):
            raise FormatError(f"{where}: chunk digest {digest!r:.100} is not a sha256 digest")
        kind = _str(obj, "chunkType", where)
        if kind not in ("", "data", CHUNK_ZEROS):
            raise FormatError(f"{where}: unknown chunkType {kind!r:.40}")
        if size <= 0:
            raise FormatError(f"{where}: chunk at {chunk_offset} lies beyond the file size {entry.size}")
        if size > estargz.MAX_CHUNK or (kind != CHUNK_ZEROS and end - start > estargz.MAX_CHUNK_SPAN):
            raise FormatError(f"{where}: chunk at {chunk_offset} is {size} bytes from {end - start} compressed, "
                              f"over the limits ({estargz.MAX_CHUNK} and {estargz.MAX_CHUNK_SPAN})")
        if not start < end <= data_end:
            raise FormatError(f"{where}: chunk at {chunk_offset} has compressed range [{start}, {end}) "
                              f"outside the data before the TOC at {data_end}")
        chunks.append(toc.Chunk(offset=chunk_offset, size=size, blob_start=start, blob_end=end,
                                digest=digest, zeros=kind == CHUNK_ZEROS))
    if len(chunks) > 1:
        chunks.sort(key=lambda c: c.offset)
    toc.check_coverage(entry, chunks)
    entry.chunks = chunks


def decompress_chunk(data: bytes, chunk: toc.Chunk) -> bytes:
    """The chunk's ``size`` bytes from its compressed range ``[blob_start, blob_end)``.

    Decompression stops once ``inner_offset + size`` bytes exist, so a lying
    range cannot make us produce more. The digest is checked by the caller.
    """
    want = chunk.inner_offset + chunk.size
    if (chunk.size <= 0 or chunk.inner_offset < 0 or want > estargz.MAX_CHUNK
            or chunk.blob_end - chunk.blob_start > estargz.MAX_CHUNK_SPAN):
        raise FormatError(f"bad chunk bounds: inner offset {chunk.inner_offset}, size {chunk.size}, "
                          f"{chunk.blob_end - chunk.blob_start} bytes compressed")
    out = _bounded_decompress(data, want, f"chunk at blob offset {chunk.blob_start}")
    if len(out) < want:
        raise FormatError(f"chunk at blob offset {chunk.blob_start} decompresses to {len(out)} bytes, need {want}")
    return out[chunk.inner_offset:]


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
        while piece := reader.read(_COPY_PIECE):
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
        n = len(_bounded_decompress(data, max_header_bytes + 1, f"blob bytes {r[0]}-{r[1] - 1}"))
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


# --------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------


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
        kind, header, entry, size = estargz.tar_header_and_entry(info)
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
            digest = estargz.copy_chunk(payload, length, self._z.write, whole, entry["name"], size)
            end = self._z.end_frame()
            fields = {"offset": start, "endOffset": end, "chunkSize": length, "chunkOffset": position,
                      "chunkDigest": digest}
            if first:
                entry.update(fields)
                first = False
            else:
                self._entries.append({"type": estargz.CHUNK, "name": entry["name"], **fields})
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
                    if not estargz._skipped(info):
                        writer.add(info, tf.extractfile(info) if info.isreg() else None)
            else:
                _write_reordered(writer, tf, prioritized)
    except (tarfile.TarError, EOFError) as e:
        raise FormatError(f"input is not a readable tar stream: {e}") from None
    return writer.finish()


def _write_reordered(writer: _Writer, tf: tarfile.TarFile, prioritized: Sequence[str]) -> None:
    for info, payload, _ in estargz.reordered_members(tf, prioritized):
        writer.add(info, payload)
