"""eStargz reading: its footer, its TOC, and the decompression of its chunks.

An eStargz blob is a run of gzip members whose concatenation is an ordinary
tar stream; each regular-file chunk starts a member of its own, so a byte
range of the blob can be fetched and gunzipped on its own. The TOC
(``stargz.index.json``) lists every entry with the compressed offsets of its
chunks and sits in the second-to-last member; a fixed-size empty gzip footer
holds the TOC's offset. docs/formats.md has the byte layout.

The reader is pure (the caller fetches bytes and passes them in) and treats
every byte as hostile: all sizes are bounded and any inconsistency becomes a
FormatError, because a layer comes from a registry we do not control. The
writer is in estargz_writer.py; the entry vocabulary that zstd:chunked
shares, in tocentries.py.
"""

from __future__ import annotations

import json
import operator
import re
import tarfile
import zlib
from typing import Callable, Iterable, Iterator

from als.digest import is_sha256, sha256_digest
from als.errors import FormatError, VerificationError
from als.formats import toc, tocentries
from als.formats.tocentries import (CHUNK, MAX_CHUNK, MAX_CHUNK_SPAN, MAX_INT64, MAX_TOC_ENTRIES, check_digest,
                                    checked_fields, clean_name, climbs, toc_entry)

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
_FRONT = (PREFETCH_LANDMARK, "./" + PREFETCH_LANDMARK)  # as a TOC may spell them
_NO_FRONT = (NO_PREFETCH_LANDMARK, "./" + NO_PREFETCH_LANDMARK)
LANDMARK_CONTENTS = b"\x0f"
# The layer annotations, here under the format's name; zstd:chunked layers carry the size one too.
TOC_DIGEST_ANNOTATION = tocentries.TOC_DIGEST_ANNOTATION
UNCOMPRESSED_SIZE_ANNOTATION = tocentries.UNCOMPRESSED_SIZE_ANNOTATION

GZIP_WBITS = 31  # zlib: gzip header and trailer
# Inflating chunks is much of the store's CPU when a container reads a lot: ISA-L's inflate
# (python-isal, zlib's interface) is about 1.5x zlib's on layer data. Without it, zlib.
try:
    from isal import isal_zlib as inflater
    INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error, inflater.error)
except ImportError:  # pragma: no cover - isal is a dependency; a build without it still works
    inflater = zlib  # type: ignore[assignment]
    INFLATE_ERRORS = (zlib.error,)
_BLOCK = tarfile.BLOCKSIZE
_HEX16_RE = re.compile(rb"[0-9a-fA-F]{16}")

# Footer layouts (docs/formats.md, "Footer"). Both are complete, empty gzip
# members whose Extra field carries "%016x" % toc_offset + "STARGZ".
_GZIP_FEXTRA_HEADER = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
_EMPTY_DEFLATE_AND_TRAILER = b"\x01\x00\x00\xff\xff" + bytes(8)
_ESTARGZ_EXTRA_PREFIX = b"\x1a\x00SG\x16\x00"  # XLEN=26, subfield "SG", LEN=22
_LEGACY_EXTRA_PREFIX = b"\x16\x00"  # XLEN=22, no subfield header
_MAGIC = b"STARGZ"


# --------------------------------------------------------------------------
# Footer
# --------------------------------------------------------------------------


def _footer(extra_prefix: bytes, toc_offset: int) -> bytes:
    if not 0 <= toc_offset <= MAX_INT64:
        raise ValueError(f"TOC offset {toc_offset} out of range")
    return _GZIP_FEXTRA_HEADER + extra_prefix + b"%016x" % toc_offset + _MAGIC + _EMPTY_DEFLATE_AND_TRAILER


def make_footer(toc_offset: int) -> bytes:
    """Return the 51-byte eStargz footer pointing at ``toc_offset``."""
    return _footer(_ESTARGZ_EXTRA_PREFIX, toc_offset)


def make_legacy_footer(toc_offset: int) -> bytes:
    """Return the 47-byte footer of the original (google/crfs) stargz."""
    return _footer(_LEGACY_EXTRA_PREFIX, toc_offset)


def _footer_offset(footer: bytes, extra_prefix: bytes) -> int | None:
    """TOC offset from one footer layout, or None if ``footer`` is not that layout.

    Fields are checked at fixed positions (as containers/storage does), and the
    whole footer must also be a complete empty gzip member, as sgz requires.
    """
    hex_at = len(_GZIP_FEXTRA_HEADER) + len(extra_prefix)
    if not footer.startswith(_GZIP_FEXTRA_HEADER + extra_prefix):
        return None
    hex_digits = footer[hex_at : hex_at + 16]
    if footer[hex_at + 16 : hex_at + 22] != _MAGIC or not _HEX16_RE.fullmatch(hex_digits):
        return None
    d = zlib.decompressobj(GZIP_WBITS)
    try:
        if d.decompress(footer, 1) or not d.eof or d.unused_data:
            return None
    except zlib.error:
        return None
    return int(hex_digits, 16)


def parse_footer(tail: bytes, blob_size: int) -> tuple[int, int]:
    """Find the TOC: return ``(toc_offset, footer_size)`` from the blob's tail.

    ``tail`` is the last bytes of the blob: at least FOOTER_SIZE of them, or the
    whole blob if it is shorter. Both the eStargz footer (51 bytes) and the
    legacy stargz one (47 bytes) are accepted, eStargz first, the way sgz tries
    them. The offset must leave room for the TOC member before the footer.
    """
    if blob_size < LEGACY_FOOTER_SIZE:
        raise FormatError(f"blob of {blob_size} bytes is too small to hold a stargz footer")
    if len(tail) > blob_size:
        raise FormatError(f"got {len(tail)} tail bytes of a {blob_size}-byte blob")
    need = min(FOOTER_SIZE, blob_size)
    if len(tail) < need:
        raise FormatError(f"need the last {need} bytes of the blob to find its footer, got {len(tail)}")

    looks_gzip = False
    for size, extra_prefix in (
        (FOOTER_SIZE, _ESTARGZ_EXTRA_PREFIX),
        (LEGACY_FOOTER_SIZE, _LEGACY_EXTRA_PREFIX),
    ):
        if len(tail) < size:
            continue
        footer = bytes(tail[-size:])
        looks_gzip = looks_gzip or footer.startswith(b"\x1f\x8b")
        toc_offset = _footer_offset(footer, extra_prefix)
        if toc_offset is None:
            continue
        if not 0 <= toc_offset < blob_size - size:
            raise FormatError(
                f"stargz footer points at TOC offset {toc_offset}, outside the "
                f"{blob_size - size} bytes before the {size}-byte footer"
            )
        return toc_offset, size
    if not looks_gzip:
        raise FormatError("blob does not end with a gzip member: not an eStargz layer")
    raise FormatError("blob ends with a gzip member that is not a stargz footer: not an eStargz layer")


# --------------------------------------------------------------------------
# Bounded gunzip
# --------------------------------------------------------------------------


class _Gunzip:
    """Incremental gunzip that never produces more than it is asked for.

    ``read(n)`` returns at most ``n`` bytes, so hostile input (a decompression
    bomb) costs at most what the caller asked for. With ``multi_member`` it
    continues into the following gzip members, as a chunk's byte range may hold
    several; without, it stops at the end of the first member.
    """

    def __init__(self, data: bytes, *, multi_member: bool) -> None:
        self._d = inflater.decompressobj(GZIP_WBITS)
        self._pending: bytes | memoryview = memoryview(data)
        self._multi = multi_member
        self._done = False

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n and not self._done:
            if self._d.eof:
                rest = self._d.unused_data
                if not self._multi or not rest:
                    self._done = True
                    break
                self._d = inflater.decompressobj(GZIP_WBITS)
                self._pending = rest
            try:
                piece = self._d.decompress(self._pending, n - len(out))
            except INFLATE_ERRORS as e:
                raise FormatError(f"corrupt gzip data: {e}") from None
            self._pending = self._d.unconsumed_tail
            if not out and len(piece) == n:
                return piece  # all of it in one piece (a whole chunk, mostly): no copy of it
            out += piece
            if not piece and not self._pending and not self._d.eof:
                self._done = True  # input ran out inside a member
        return bytes(out)



def _blob_ends(offsets: list[int], toc_offset: int) -> list[int]:
    """For each entry (given by its ``offset``), where the compressed range starting there ends.

    That is the next later entry's offset that is non-zero and differs from this
    one (min-chunk-size mode repeats an offset with growing innerOffset), or the
    TOC offset for the last data. Computed back to front in one pass.
    """
    ends = [0] * len(offsets)
    following: int | None = None  # offset of the nearest later entry with data
    following_end = toc_offset  # the end computed for that entry
    for i in range(len(offsets) - 1, -1, -1):
        offset = offsets[i]
        if following is None:
            end = toc_offset
        elif offset != following:
            end = following
        else:
            end = following_end
        ends[i] = end
        if offset != 0:
            following, following_end = offset, end
    return ends


def _piece(get) -> tuple[int, int, str, int, int]:
    """What a reg or chunk entry (its checked fields' ``get``) says of its chunk, kept instead of its
    JSON object until the chunks are built: chunkOffset, chunkSize, chunkDigest, offset, innerOffset."""
    return get("chunkOffset", 0), get("chunkSize", 0), get("chunkDigest", ""), get("offset", 0), get("innerOffset", 0)


def _chunk(piece: tuple[int, int, str, int, int], end: int, entry: toc.Entry, toc_offset: int,
           digest_fallback: bool) -> toc.Chunk:
    """One chunk of regular file ``entry``, from its reg entry's or a chunk entry's ``_piece``."""
    chunk_offset, size, digest, start, inner_offset = piece
    size = size or entry.size - chunk_offset
    if size <= 0:
        raise FormatError(f"regular file {entry.name!r:.300}: chunk at {chunk_offset} lies beyond "
                          f"the file size {entry.size}")
    if not digest:
        if not (digest_fallback and entry.digest):
            raise FormatError(f"regular file {entry.name!r:.300}: chunk at {chunk_offset} has no chunkDigest")
        digest = entry.digest
    # The file's own digest is checked already, and a one-chunk file's chunkDigest repeats it.
    if digest != entry.digest and not is_sha256(digest):
        check_digest(digest, f"regular file {entry.name!r:.300}: chunkDigest")
    if inner_offset + size > MAX_CHUNK or end - start > MAX_CHUNK_SPAN:
        raise FormatError(
            f"regular file {entry.name!r:.300}: chunk at {chunk_offset} needs {inner_offset + size} bytes "
            f"inflated from {end - start} compressed, over the limits of {MAX_CHUNK} and {MAX_CHUNK_SPAN}"
        )
    if not start < end <= toc_offset:
        raise FormatError(
            f"regular file {entry.name!r:.300}: chunk at {chunk_offset} has compressed range "
            f"[{start}, {end}) outside the data before the TOC at {toc_offset}"
        )
    return toc.Chunk(chunk_offset, size, start, end, digest, inner_offset)  # positional: see toc_entry


def _attach_chunks(
    entry: toc.Entry,
    members: list[tuple[int, tuple]],
    ends: list[int],
    toc_offset: int,
    digest_fallback: bool,
) -> None:
    """Build ``entry.chunks`` from its reg entry and following chunk entries ((entry index, _piece) each)."""
    if entry.size == 0:
        if len(members) > 1:
            raise FormatError(f"regular file {entry.name!r:.300} is empty but has chunk entries")
        return
    if len(members) == 1:  # most files: one chunk, which must be the whole file
        i, piece = members[0]
        chunk = _chunk(piece, ends[i], entry, toc_offset, digest_fallback)
        entry.chunks = [chunk]
        if chunk.offset != 0 or chunk.size != entry.size:
            toc.check_coverage(entry, entry.chunks)  # raises, saying how they differ
        return
    chunks = [_chunk(piece, ends[i], entry, toc_offset, digest_fallback) for i, piece in members]
    chunks.sort(key=_chunk_offset)
    toc.check_coverage(entry, chunks)
    entry.chunks = chunks


_chunk_offset = operator.attrgetter("offset")


def _normalise(items: Iterable[object], digest: str, toc_offset: int, max_entries: int = MAX_TOC_ENTRIES) -> toc.TOC:
    """The TOC from its JSON entries, taken one at a time: only what the chunks still need
    (``_piece``) outlives each entry's JSON object."""
    entries: list[toc.Entry] = []
    warnings: list[str] = []
    offsets: list[int] = []  # each entry's "offset", for _blob_ends
    files: list[tuple[toc.Entry, list[tuple[int, tuple]]]] = []
    members: list[tuple[int, tuple]] | None = None  # the current regular file's (entry index, _piece)
    file_name = ""  # its name as the TOC spells it, to match chunk entries without cleaning theirs
    chunk_info = False  # whether any entry has a chunkDigest or is a chunk entry
    for i, obj in enumerate(items):
        if i == max_entries:
            raise FormatError(f"TOC has more than {max_entries} entries, over the limit of {max_entries}")
        get = checked_fields(obj, i).get
        offsets.append(get("offset", 0))
        kind = get("type", "")
        name = get("name", "")
        if kind == CHUNK:
            chunk_info = True
            if members is None:
                raise FormatError(f"TOC entry {i}: chunk entry does not follow a regular file")
            if name and name != file_name and clean_name(name) != entries[-1].name:
                raise FormatError(
                    f"TOC entry {i}: chunk of {name!r:.300} follows regular file {entries[-1].name!r:.300}"
                )
            members.append((i, _piece(get)))
            continue
        if not chunk_info and get("chunkDigest"):
            chunk_info = True
        entry = toc_entry(obj, i)
        entries.append(entry)
        if climbs(name) or (kind == toc.HARDLINK and climbs(get("linkName", ""))):
            warnings.append(f"TOC entry {i} {name!r:.300} (link {get('linkName', '')!r:.300}) climbs above "
                            f"the layer root with '..'; confined to {entry.name!r:.300}")
        members, file_name = ([(i, _piece(get))], name) if kind == toc.REG else (None, "")
        if members is not None:
            files.append((entry, members))
    ends = _blob_ends(offsets, toc_offset)
    # sgz's fallback: a layer without any chunkDigest (and without chunk
    # entries) may be verified with each file's whole-content digest instead.
    digest_fallback = not chunk_info
    for entry, members in files:
        _attach_chunks(entry, members, ends, toc_offset, digest_fallback)
    return toc.TOC(entries=entries, digest=digest, compression=toc.GZIP, data_end=toc_offset, warnings=warnings)


def parse_toc(
    data: bytes,
    expected_digest: str | None,
    *,
    toc_offset: int,
    max_toc_size: int = 64 << 20,
    max_entries: int = MAX_TOC_ENTRIES,
    on_front: Callable[[int], None] | None = None,
) -> toc.TOC:
    """Decode, verify and normalise the TOC member of an eStargz blob.

    ``data`` is exactly the blob bytes ``[toc_offset, blob_size - footer_size)``.
    Only the first gzip member is inflated and never more than one tar header
    plus ``max_toc_size`` bytes, so a hostile TOC cannot exhaust memory. The
    digest is over the JSON bytes (not the gzip member), which is what the
    ``containerd.io/snapshot/stargz/toc.digest`` annotation vouches for; a
    mismatch raises VerificationError before the JSON is even parsed.

    ``on_front`` hears where the blob's prioritised front ends (its
    ``.prefetch.landmark``) as soon as the JSON is decoded, before the
    entries are checked and built (most of the parse): the store starts its
    prefetch on that word. Only a head start: what it fetches is verified
    chunk by chunk against the TOC once that is built.
    """
    if toc_offset < 0:
        raise FormatError(f"negative TOC offset {toc_offset}")
    gunzip = _Gunzip(data, multi_member=False)
    header = gunzip.read(_BLOCK)
    if len(header) < _BLOCK:
        raise FormatError("TOC member ends before its tar header")
    try:
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except (tarfile.TarError, ValueError, OverflowError) as e:
        raise FormatError(f"TOC member does not start with a tar header: {e}") from None
    if info.name != TOC_NAME or info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise FormatError(f"TOC member starts with {info.name!r:.300}, not a regular file {TOC_NAME!r}")
    if not 0 <= info.size <= max_toc_size:
        raise FormatError(f"TOC of {info.size} bytes exceeds the limit of {max_toc_size}")
    raw_json = gunzip.read(info.size)
    if len(raw_json) != info.size:
        raise FormatError(f"TOC member is truncated: {len(raw_json)} of {info.size} JSON bytes")
    digest = sha256_digest(raw_json)
    if expected_digest is not None and digest != expected_digest:
        raise VerificationError(f"TOC digest is {digest}, the manifest says {expected_digest}")
    # json.loads(bytes) decodes them so first; done here, the bytes can go before the JSON is decoded.
    text = raw_json.decode(json.detect_encoding(raw_json), "surrogatepass")
    del raw_json
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"TOC is not valid JSON: {e}") from None
    del text
    items = toc.entry_list(doc, "TOC", max_entries)
    del doc
    if on_front is not None:
        end = front_end(items, toc_offset)
        if end:
            on_front(end)
    return _normalise(_consumed(items), digest, toc_offset, max_entries)


def front_end(items: list, toc_offset: int) -> int:
    """Where the prioritised front of the blob ends, from the TOC's raw entries: the offset of
    its ``.prefetch.landmark``; 0 if it has none, or a ``.no.prefetch.landmark``."""
    for obj in items:
        name = obj.get("name") if isinstance(obj, dict) else None
        if name in _NO_FRONT:
            return 0
        if name in _FRONT:
            offset = obj.get("offset")
            return offset if type(offset) is int and 0 < offset <= toc_offset else 0
    return 0


def _consumed(items: list) -> Iterator[object]:
    """``items`` one by one, each dropped from the list as it is handed out: a TOC's JSON objects
    (about as much memory as the tree built from them) are freed while the tree is built, not after."""
    for i in range(len(items)):
        obj, items[i] = items[i], None
        yield obj


def decompress_chunk(data: bytes, chunk: toc.Chunk) -> bytes:
    """Return the chunk's ``size`` uncompressed bytes from its compressed range.

    ``data`` is the blob bytes ``[chunk.blob_start, chunk.blob_end)``. The range
    may hold one member or several; inflation stops once ``inner_offset + size``
    bytes exist, so a lying range cannot make us inflate more. The digest is not
    checked here: compare ``sha256_digest(result)`` with ``chunk.digest``.
    """
    want = chunk.inner_offset + chunk.size
    if chunk.size <= 0 or chunk.inner_offset < 0 or want > MAX_CHUNK:
        raise FormatError(f"bad chunk bounds: inner offset {chunk.inner_offset}, size {chunk.size}")
    out = _Gunzip(data, multi_member=True).read(want)
    if len(out) < want:
        raise FormatError(
            f"chunk at blob offset {chunk.blob_start} inflates to {len(out)} bytes, need {want}"
        )
    return out[chunk.inner_offset :]


