"""zstd:chunked reading: its annotations, locating and verifying its TOC, decompressing its chunks.

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
treats every byte as hostile: decompression is always bounded. The writer is
in zstdchunked_writer.py, the layer's exact uncompressed size (tar-split or
header frames) in zstdchunked_size.py.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import zstandard

from als.digest import is_sha256, sha256_digest
from als.errors import FormatError, VerificationError
from als.oci import OCI_LAYER_ZSTD
from als.formats import toc, tocentries
from als.formats.tocentries import (CHUNK, COPY_PIECE, MAX_CHUNK, MAX_CHUNK_SPAN, MAX_TOC_ENTRIES,
                                    TOC_DIGEST_ANNOTATION, checked_fields, clean_name, toc_entry)

MEDIA_TYPE = OCI_LAYER_ZSTD
_PREFIXES = ("io.github.containers.zstd-chunked.", "io.containers.zstd-chunked.")
CHECKSUM_ANNOTATIONS = tuple(p + "manifest-checksum" for p in _PREFIXES)
POSITION_ANNOTATIONS = tuple(p + "manifest-position" for p in _PREFIXES)
CHECKSUM_ANNOTATION, OLD_CHECKSUM_ANNOTATION = CHECKSUM_ANNOTATIONS
POSITION_ANNOTATION, OLD_POSITION_ANNOTATION = POSITION_ANNOTATIONS
TAR_SPLIT_POSITION_ANNOTATION = _PREFIXES[0] + "tarsplit-position"  # "offset:length:uncompressed length"
# Older writers vouched for the tar-split with this annotation; newer ones with the TOC's "tarSplitDigest".
TAR_SPLIT_CHECKSUM_ANNOTATION = _PREFIXES[0] + "tarsplit-checksum"
UNCOMPRESSED_SIZE_ANNOTATION = tocentries.UNCOMPRESSED_SIZE_ANNOTATION

MANIFEST_TYPE_CRFS = 1
SKIPPABLE_MAGIC = 0x184D2A50  # the first of the 16 skippable-frame magics
_SKIPPABLE_HEADER = 8
OLD_FOOTER_MAGIC = b"GnUlInUx"
CHUNK_ZEROS = "zeros"
MAX_WINDOW = 1 << 27  # largest zstd window accepted (128 MiB, zstd's own default limit)


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
            or TOC_DIGEST_ANNOTATION in out):
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


def bounded_decompress(data: bytes, limit: int, what: str) -> bytes:
    """Decompress the zstd frames in ``data`` (skippable frames are skipped), at most ``limit`` bytes."""
    try:
        reader = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).stream_reader(
            io.BytesIO(data), read_across_frames=True)
        out = bytearray()
        while len(out) < limit:
            piece = reader.read(min(limit - len(out), COPY_PIECE))
            if not piece:
                break
            out += piece
        return bytes(out)
    except zstandard.ZstdError as e:
        raise FormatError(f"{what}: corrupt zstd data: {e}") from None


def parse_manifest(data: bytes, location: ManifestLocation, *,
                   max_entries: int = MAX_TOC_ENTRIES) -> toc.TOC:
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
    raw = bounded_decompress(data, location.uncompressed_length + 1, "zstd:chunked manifest")
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
        get = checked_fields(obj, i).get
        if get("type") == CHUNK:
            if current is None:
                raise FormatError(f"TOC entry {i}: chunk entry does not follow a regular file")
            name = get("name", "")
            if name and name != file_name and clean_name(name) != current[0].name:
                raise FormatError(f"TOC entry {i}: chunk of {name!r:.300} follows {current[0].name!r:.300}")
            current[1].append(obj)
            continue
        entry = toc_entry(obj, i)
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
        if size > MAX_CHUNK or (kind != CHUNK_ZEROS and end - start > MAX_CHUNK_SPAN):
            raise FormatError(f"{where}: chunk at {chunk_offset} is {size} bytes from {end - start} compressed, "
                              f"over the limits ({MAX_CHUNK} and {MAX_CHUNK_SPAN})")
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
    if (chunk.size <= 0 or chunk.inner_offset < 0 or want > MAX_CHUNK
            or chunk.blob_end - chunk.blob_start > MAX_CHUNK_SPAN):
        raise FormatError(f"bad chunk bounds: inner offset {chunk.inner_offset}, size {chunk.size}, "
                          f"{chunk.blob_end - chunk.blob_start} bytes compressed")
    out = bounded_decompress(data, want, f"chunk at blob offset {chunk.blob_start}")
    if len(out) < want:
        raise FormatError(f"chunk at blob offset {chunk.blob_start} decompresses to {len(out)} bytes, need {want}")
    return out[chunk.inner_offset:]

