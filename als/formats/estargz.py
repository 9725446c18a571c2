"""eStargz: reading its footer and TOC, decompressing its chunks, and writing it.

An eStargz blob is a run of gzip members whose concatenation is an ordinary
tar stream; each regular-file chunk starts a member of its own, so a byte
range of the blob can be fetched and gunzipped on its own. The TOC
(``stargz.index.json``) lists every entry with the compressed offsets of its
chunks and sits in the second-to-last member; a fixed-size empty gzip footer
holds the TOC's offset. docs/formats.md has the byte layout.

The reader is pure (the caller fetches bytes and passes them in) and treats
every byte as hostile: all sizes are bounded and any inconsistency becomes a
FormatError, because a layer comes from a registry we do not control.
"""

from __future__ import annotations

import base64
import copy
import datetime as _dt
import functools
import hashlib
import io
import json
import operator
import posixpath
import re
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Sequence

from als.digest import is_sha256, sha256_digest
from als.errors import FormatError, VerificationError
from als.formats import toc

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"

LANDMARK_CONTENTS = b"\x0f"
CHUNK = "chunk"  # TOC entry type continuing the preceding regular file

_GZIP_WBITS = 31  # zlib: gzip header and trailer
_BLOCK = tarfile.BLOCKSIZE
_TAR_EOF = bytes(2 * _BLOCK)
_COPY_PIECE = 1 << 20  # how much file payload the writer holds in memory at once
_MAX_NAME_COMPONENT = 255  # NAME_MAX, in bytes
_MAX_PATH = 4095  # PATH_MAX less its NUL: no extractor could create a longer name or symlink target
_MAX_XATTR_VALUE = 65536  # XATTR_SIZE_MAX: no file system takes a larger value
_MAX_INT64 = (1 << 63) - 1
_NO_ID = (1 << 32) - 1  # (uid_t)-1
_MAX_MAJOR, _MAX_MINOR = (1 << 12) - 1, (1 << 20) - 1
# Limits that keep a hostile TOC's cost bounded. A chunk is held in memory
# whole (inflated, plus its compressed range), so both are capped; sgz writes
# 4 MiB chunks. MAX_TOC_ENTRIES bounds the objects a TOC turns into.
MAX_CHUNK = 32 << 20  # innerOffset + size of one chunk, uncompressed
MAX_CHUNK_SPAN = 64 << 20  # compressed bytes fetched for one chunk
MAX_TOC_ENTRIES = 1 << 20

_HEX16_RE = re.compile(rb"[0-9a-fA-F]{16}")
_RFC3339_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)

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
    if not 0 <= toc_offset <= _MAX_INT64:
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
    d = zlib.decompressobj(_GZIP_WBITS)
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
        self._d = zlib.decompressobj(_GZIP_WBITS)
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
                self._d = zlib.decompressobj(_GZIP_WBITS)
                self._pending = rest
            try:
                piece = self._d.decompress(self._pending, n - len(out))
            except zlib.error as e:
                raise FormatError(f"corrupt gzip data: {e}") from None
            self._pending = self._d.unconsumed_tail
            out += piece
            if not piece and not self._pending and not self._d.eof:
                self._done = True  # input ran out inside a member
        return bytes(out)


# --------------------------------------------------------------------------
# TOC
# --------------------------------------------------------------------------


# The TOC fields the parser reads, with the JSON type each must have. Other keys
# (userName, groupName, ...) are not read, so they are not checked either.
_FIELD_TYPES: dict[str, type] = {
    "name": str, "type": str, "size": int, "modtime": str, "linkName": str, "mode": int,
    "uid": int, "gid": int, "devMajor": int, "devMinor": int, "xattrs": dict, "digest": str,
    "offset": int, "innerOffset": int, "chunkOffset": int, "chunkSize": int, "chunkDigest": str,
}
_DEVICE_TYPES = frozenset({toc.CHAR, toc.BLOCK})


def checked_fields(obj: object, index: int) -> dict:
    """Return TOC JSON entry ``obj`` once every field the parser reads has its JSON type and range.

    Only the keys present are visited, and a missing key's default is always
    valid, so afterwards ``obj.get(key, default)`` needs no further checks. A
    TOC has many thousand entries: this one pass replaces a lookup and a check
    per possible field. Shared with the zstd:chunked parser, whose entries use
    the same vocabulary.
    """
    if not isinstance(obj, dict):
        raise FormatError(f"TOC entry {index} is not a JSON object")
    for key, value in obj.items():
        kind = _FIELD_TYPES.get(key)
        # bool is an int subclass; JSON true must not pass as 1, hence type() rather than isinstance.
        if kind is None or (type(value) is kind and (kind is not int or 0 <= value <= _MAX_INT64)):
            continue
        if type(value) is not kind:
            raise FormatError(f"TOC entry {index}: {key!r} must be a {kind.__name__}, got {value!r:.80}")
        raise FormatError(f"TOC entry {index}: {key!r} = {value} is out of range")
    xattrs = obj.get("xattrs")
    if xattrs:
        for key, value in xattrs.items():
            if type(value) is not str:
                raise FormatError(f"TOC entry {index}: xattr {key!r} is not a base64 string")
    return obj


def _check_text(text: str, what: str) -> bytes:
    """Return ``text`` as file-system bytes, refusing what no file system can hold.

    Lone surrogates U+DC80..U+DCFF stand for undecodable bytes (Python's
    surrogateescape convention, which the writer uses for non-UTF-8 tar names).
    """
    if "\x00" in text:
        raise FormatError(f"{what} {text!r:.300} contains a NUL byte")
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise FormatError(f"{what} {text!r:.300} is not valid UTF-8") from None


def clean_name(name: str, what: str = "name") -> str:
    """Normalise a tar/TOC path the way sgz does: ``./a/b/`` → ``a/b``, root → ``""``.

    ".." cannot climb above the root after this. Names no file system could
    hold (NUL, a component over 255 bytes) raise FormatError.
    """
    size = len(_check_text(name, what))
    cleaned = posixpath.normpath("/" + name).lstrip("/")
    # Cleaning only drops components, so a name of at most NAME_MAX bytes cannot have a
    # component or a cleaned path over the limits: the common case skips the checks below.
    if size > _MAX_NAME_COMPONENT:
        if len(_check_text(cleaned, what)) > _MAX_PATH:
            raise FormatError(f"{what} {name!r:.300} is longer than {_MAX_PATH} bytes")
        for component in cleaned.split("/"):
            if len(_check_text(component, what)) > _MAX_NAME_COMPONENT:
                raise FormatError(f"{what} {name!r:.300} has a component longer than 255 bytes")
    return cleaned


def _climbs(name: str) -> bool:
    """Whether a relative name uses ".." to reach above its root (``clean_name`` confines it)."""
    return ".." in name and posixpath.normpath(name.lstrip("/") or ".").split("/")[0] == ".."


@functools.lru_cache(maxsize=4096)
def _epoch_seconds(text: str) -> tuple[int, int]:
    """Seconds since the epoch (negative before 1970) and nanoseconds of an RFC 3339 time;
    ValueError says what is wrong with it.

    Cached because a layer's files share few distinct times (a package's files
    all carry its build time): the datetime arithmetic is the costly part of a
    TOC entry otherwise.
    """
    m = _RFC3339_RE.fullmatch(text)
    if m is None:
        raise ValueError("is not RFC 3339")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    nsec = int((m.group(7) or "")[:9].ljust(9, "0"))  # Go writes up to 9 digits; more are truncated
    zone = m.group(8)
    if zone in ("Z", "z"):
        tz = _dt.timezone.utc
    else:
        sign = -1 if zone[0] == "-" else 1
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        if hours > 23 or minutes > 59:
            raise ValueError("has a bad zone offset")
        tz = _dt.timezone(sign * _dt.timedelta(hours=hours, minutes=minutes))
    try:
        when = _dt.datetime(year, month, day, hour, minute, second, tzinfo=tz)
    except ValueError as e:  # "day is out of range for month", say
        raise ValueError(f"is not a valid time: {e}") from None
    return (when - _EPOCH) // _dt.timedelta(seconds=1), nsec


def _parse_modtime(text: str, index: int, name: str) -> tuple[int, int]:
    """Entry ``index``'s modtime: seconds since the epoch and nanoseconds ((0, 0) if it has none)."""
    if not text:
        return 0, 0
    try:
        return _epoch_seconds(text)
    except ValueError as e:
        raise FormatError(f"{_where(index, name)}: modtime {text!r:.80} {e}") from None


def _decode_xattrs(raw: dict[str, str], where: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in raw.items():
        if not key or len(_check_text(key, f"{where}: xattr name")) > _MAX_NAME_COMPONENT:
            raise FormatError(f"{where}: bad xattr name {key!r:.300}")
        try:
            out[key] = base64.b64decode(value, validate=True)
        except ValueError:
            raise FormatError(f"{where}: xattr {key!r} is not valid base64") from None
        if len(out[key]) > _MAX_XATTR_VALUE:
            raise FormatError(f"{where}: xattr {key!r} is longer than {_MAX_XATTR_VALUE} bytes")
    return out


def _check_digest(value: str, what: str) -> None:
    if not is_sha256(value):
        raise FormatError(f"{what} {value!r:.100} is not a sha256:<64 hex> digest")


def _where(index: int, name: str) -> str:
    """How an error names a TOC entry; built only when there is an error to report."""
    return f"TOC entry {index} ({name!r:.300})"


def toc_entry(obj: dict, index: int) -> toc.Entry:
    """Turn a non-chunk TOC entry, checked by ``checked_fields``, into a toc.Entry (chunks come later).

    Shared with the zstd:chunked parser.
    """
    get = obj.get
    kind = get("type", "")
    if kind not in toc.ENTRY_TYPES:
        raise FormatError(f"TOC entry {index}: unknown entry type {kind!r:.80}")
    name = clean_name(get("name", ""))
    if name == "" and kind != toc.DIR:
        raise FormatError(f"{_where(index, name)}: the root entry must be a directory, not {kind}")
    # uid_t is 32 bits ((uid_t)-1 means "none"), and FUSE carries a device number in 32 bits
    # (12-bit major, 20-bit minor): larger values would fail every stat, or name another device.
    uid, gid = get("uid", 0), get("gid", 0)
    if uid >= _NO_ID or gid >= _NO_ID:
        raise FormatError(f"{_where(index, name)}: uid {uid} or gid {gid} is out of range")
    dev_major, dev_minor = get("devMajor", 0), get("devMinor", 0)
    if kind in _DEVICE_TYPES and (dev_major > _MAX_MAJOR or dev_minor > _MAX_MINOR):
        raise FormatError(f"{_where(index, name)}: device {dev_major}:{dev_minor} is out of range")
    linkname = ""
    if kind == toc.HARDLINK:
        linkname = get("linkName", "")
        if not linkname:
            raise FormatError(f"{_where(index, name)}: hard link without linkName")
        linkname = clean_name(linkname, "hard link target")
    elif kind == toc.SYMLINK:
        linkname = get("linkName", "")
        if not linkname:
            raise FormatError(f"{_where(index, name)}: symlink without linkName")
        if len(_check_text(linkname, "symlink target")) > _MAX_PATH:
            raise FormatError(f"{_where(index, name)}: symlink target is longer than {_MAX_PATH} bytes")
    digest = get("digest", "") if kind == toc.REG else ""
    if digest and not is_sha256(digest):
        _check_digest(digest, f"{_where(index, name)}: digest")
    modtime = get("modtime")
    mtime, mtime_nsec = _parse_modtime(modtime, index, name) if modtime else (0, 0)
    xattrs = get("xattrs")
    # Positional, in toc.Entry's field order: keywords cost a third of the call, per entry.
    return toc.Entry(
        name,
        kind,
        get("mode", 0) & 0o7777,
        uid,
        gid,
        get("size", 0) if kind == toc.REG else 0,
        mtime,
        linkname,
        dev_major,
        dev_minor,
        _decode_xattrs(xattrs, _where(index, name)) if xattrs else {},
        digest,
        [],
        mtime_nsec,
    )


def _blob_ends(items: list[dict], toc_offset: int) -> list[int]:
    """For each entry, where the compressed range starting at its offset ends.

    That is the next later entry's offset that is non-zero and differs from this
    one (min-chunk-size mode repeats an offset with growing innerOffset), or the
    TOC offset for the last data. Computed back to front in one pass.
    """
    ends = [0] * len(items)
    following: int | None = None  # offset of the nearest later entry with data
    following_end = toc_offset  # the end computed for that entry
    for i in range(len(items) - 1, -1, -1):
        offset = items[i].get("offset", 0)
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


def _chunk(obj: dict, end: int, entry: toc.Entry, toc_offset: int, digest_fallback: bool) -> toc.Chunk:
    """One chunk of regular file ``entry``: its reg entry or a chunk entry, checked by ``checked_fields``."""
    get = obj.get
    chunk_offset = get("chunkOffset", 0)
    size = get("chunkSize", 0) or entry.size - chunk_offset
    if size <= 0:
        raise FormatError(f"regular file {entry.name!r:.300}: chunk at {chunk_offset} lies beyond "
                          f"the file size {entry.size}")
    digest = get("chunkDigest", "")
    if not digest:
        if not (digest_fallback and entry.digest):
            raise FormatError(f"regular file {entry.name!r:.300}: chunk at {chunk_offset} has no chunkDigest")
        digest = entry.digest
    # The file's own digest is checked already, and a one-chunk file's chunkDigest repeats it.
    if digest != entry.digest and not is_sha256(digest):
        _check_digest(digest, f"regular file {entry.name!r:.300}: chunkDigest")
    start, inner_offset = get("offset", 0), get("innerOffset", 0)
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
    members: list[int],
    items: list[dict],
    ends: list[int],
    toc_offset: int,
    digest_fallback: bool,
) -> None:
    """Build ``entry.chunks`` from its reg entry and following chunk entries (indices into ``items``)."""
    if entry.size == 0:
        if len(members) > 1:
            raise FormatError(f"regular file {entry.name!r:.300} is empty but has chunk entries")
        return
    if len(members) == 1:  # most files: one chunk, which must be the whole file
        chunk = _chunk(items[members[0]], ends[members[0]], entry, toc_offset, digest_fallback)
        entry.chunks = [chunk]
        if chunk.offset != 0 or chunk.size != entry.size:
            toc.check_coverage(entry, entry.chunks)  # raises, saying how they differ
        return
    chunks = [_chunk(items[i], ends[i], entry, toc_offset, digest_fallback) for i in members]
    chunks.sort(key=_chunk_offset)
    toc.check_coverage(entry, chunks)
    entry.chunks = chunks


_chunk_offset = operator.attrgetter("offset")


def _normalise(doc: object, digest: str, toc_offset: int, max_entries: int = MAX_TOC_ENTRIES) -> toc.TOC:
    items = toc.entry_list(doc, "TOC", max_entries)

    entries: list[toc.Entry] = []
    warnings: list[str] = []
    files: list[tuple[toc.Entry, list[int]]] = []
    members: list[int] | None = None  # the current regular file's entry indices
    file_name = ""  # its name as the TOC spells it, to match chunk entries without cleaning theirs
    chunk_info = False  # whether any entry has a chunkDigest or is a chunk entry
    for i, obj in enumerate(items):
        get = checked_fields(obj, i).get
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
            members.append(i)
            continue
        if not chunk_info and get("chunkDigest"):
            chunk_info = True
        entry = toc_entry(obj, i)
        entries.append(entry)
        if _climbs(name) or (kind == toc.HARDLINK and _climbs(get("linkName", ""))):
            warnings.append(f"TOC entry {i} {name!r:.300} (link {get('linkName', '')!r:.300}) climbs above "
                            f"the layer root with '..'; confined to {entry.name!r:.300}")
        members, file_name = ([i], name) if kind == toc.REG else (None, "")
        if members is not None:
            files.append((entry, members))
    ends = _blob_ends(items, toc_offset)
    # sgz's fallback: a layer without any chunkDigest (and without chunk
    # entries) may be verified with each file's whole-content digest instead.
    digest_fallback = not chunk_info
    for entry, members in files:
        _attach_chunks(entry, members, items, ends, toc_offset, digest_fallback)
    return toc.TOC(entries=entries, digest=digest, compression=toc.GZIP, data_end=toc_offset, warnings=warnings)


def parse_toc(
    data: bytes,
    expected_digest: str | None,
    *,
    toc_offset: int,
    max_toc_size: int = 64 << 20,
    max_entries: int = MAX_TOC_ENTRIES,
) -> toc.TOC:
    """Decode, verify and normalise the TOC member of an eStargz blob.

    ``data`` is exactly the blob bytes ``[toc_offset, blob_size - footer_size)``.
    Only the first gzip member is inflated and never more than one tar header
    plus ``max_toc_size`` bytes, so a hostile TOC cannot exhaust memory. The
    digest is over the JSON bytes (not the gzip member), which is what the
    ``containerd.io/snapshot/stargz/toc.digest`` annotation vouches for; a
    mismatch raises VerificationError before the JSON is even parsed.
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
    try:
        doc = json.loads(raw_json)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"TOC is not valid JSON: {e}") from None
    return _normalise(doc, digest, toc_offset, max_entries)


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


# --------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------


@dataclass(slots=True)
class WriteResult:
    """What a manifest needs to describe the written layer."""

    toc_digest: str  # for the TOC_DIGEST_ANNOTATION
    diff_id: str  # sha256 of the whole uncompressed tar stream we emitted
    uncompressed_size: int  # for the UNCOMPRESSED_SIZE_ANNOTATION
    compressed_size: int
    blob_digest: str  # sha256 of the compressed blob


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
            self._z = zlib.compressobj(self._level, zlib.DEFLATED, _GZIP_WBITS)
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
        self._z = zlib.compressobj(self._level, zlib.DEFLATED, _GZIP_WBITS)
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


_TOC_TYPES = {
    tarfile.REGTYPE: toc.REG,
    tarfile.AREGTYPE: toc.REG,
    tarfile.CONTTYPE: toc.REG,
    tarfile.GNUTYPE_SPARSE: toc.REG,
    tarfile.DIRTYPE: toc.DIR,
    tarfile.SYMTYPE: toc.SYMLINK,
    tarfile.LNKTYPE: toc.HARDLINK,
    tarfile.CHRTYPE: toc.CHAR,
    tarfile.BLKTYPE: toc.BLOCK,
    tarfile.FIFOTYPE: toc.FIFO,
}
_XATTR_PREFIX = "SCHILY.xattr."
# PAX records tarfile already folded into TarInfo attributes; tobuf() re-creates
# whichever of them are still needed, so stale copies must not be carried over.
_RECOMPUTED_PAX = frozenset({"path", "linkpath", "size", "uid", "gid", "uname", "gname", "mtime", "hdrcharset"})


@dataclass(frozen=True, slots=True)
class _WrittenChunk:
    offset: int  # compressed offset of the member holding the chunk
    file_offset: int
    size: int
    digest: str


def _rfc3339(mtime: float) -> str:
    seconds = int(mtime // 1 + (1 if mtime % 1 >= 0.5 else 0))  # Go rounds half up
    if seconds == 0:
        return ""
    try:
        when = _EPOCH + _dt.timedelta(seconds=seconds)
    except OverflowError:
        raise FormatError(f"mtime {mtime} cannot be written as RFC 3339") from None
    # Not strftime: it does not zero-pad years before 1000 everywhere.
    return (
        f"{when.year:04d}-{when.month:02d}-{when.day:02d}"
        f"T{when.hour:02d}:{when.minute:02d}:{when.second:02d}Z"
    )


def _lenient_clean(name: str) -> str:
    return posixpath.normpath("/" + name).lstrip("/")


def tar_header_and_entry(info: tarfile.TarInfo) -> tuple[str, bytes, dict, int]:
    """The TOC type, the tar header bytes to emit, the TOC entry and the payload size of one tar entry.

    Shared by the eStargz and zstd:chunked writers, whose TOC entries use the
    same vocabulary: headers are re-emitted as PAX, sparse files in full.
    """
    kind = _TOC_TYPES.get(info.type)
    if kind is None:
        raise FormatError(f"tar entry {info.name!r}: unsupported type {info.type!r}")
    info = copy.copy(info)
    info.pax_headers = {
        k: v
        for k, v in info.pax_headers.items()
        if k not in _RECOMPUTED_PAX and not k.startswith("GNU.sparse.")
    }
    if kind == toc.REG:
        info.type = tarfile.REGTYPE  # sparse files are written out in full
        info.sparse = None
    else:
        info.size = 0
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")

    entry: dict = {"name": info.name + ("/" if kind == toc.DIR and not info.name.endswith("/") else "")}
    entry["type"] = kind
    if kind == toc.REG and info.size:
        entry["size"] = info.size
    modtime = _rfc3339(info.mtime)
    if modtime:
        entry["modtime"] = modtime
    if kind in (toc.SYMLINK, toc.HARDLINK) and info.linkname:
        entry["linkName"] = info.linkname
    for key, value in (
        ("mode", info.mode & 0o7777),
        ("uid", info.uid),
        ("gid", info.gid),
        ("userName", info.uname),
        ("groupName", info.gname),
    ):
        if value:
            entry[key] = value
    if kind in (toc.CHAR, toc.BLOCK):
        if info.devmajor:
            entry["devMajor"] = info.devmajor
        if info.devminor:
            entry["devMinor"] = info.devminor
    xattrs = {
        k[len(_XATTR_PREFIX) :]: base64.b64encode(v.encode("utf-8", "surrogateescape")).decode("ascii")
        for k, v in info.pax_headers.items()
        if k.startswith(_XATTR_PREFIX)
    }
    if xattrs:
        entry["xattrs"] = xattrs
    return kind, header, entry, info.size


def copy_chunk(payload: BinaryIO | None, length: int, write: Callable[[bytes], object], whole,
               name: str, size: int) -> str:
    """Copy one chunk of a file's payload into a writer, hashing it; returns the chunk digest.

    ``whole`` is the file's running sha256. Memory stays at one piece of
    ``_COPY_PIECE`` bytes, whatever the chunk size. Shared with the
    zstd:chunked writer.
    """
    chunk_sum = hashlib.sha256()
    left = length
    while left:
        piece = payload.read(min(left, _COPY_PIECE)) if payload is not None else b""
        if not piece:
            raise FormatError(f"tar entry {name!r} ends before its {size} bytes")
        write(piece)
        chunk_sum.update(piece)
        whole.update(piece)
        left -= len(piece)
    return "sha256:" + chunk_sum.hexdigest()


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


def prefetch_order(
    names: Sequence[str], hardlinks: Sequence[str], prioritized: Iterable[str]
) -> tuple[list[int], int]:
    """Order entries for a prefetch layer: prioritized first, then the rest.

    ``names[i]`` is entry i's tar name and ``hardlinks[i]`` its hard-link target
    ("" if none). Returns the new order (indices) and how many leading entries
    are prioritized, i.e. where ``.prefetch.landmark`` goes. Each prioritized
    name is preceded by its parent directories, and a hard link by its target,
    so the reordered stream still extracts; names not in the input are ignored.
    """
    by_name: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        by_name.setdefault(_lenient_clean(name), []).append(i)
    moved: list[int] = []
    taken: set[int] = set()

    def move(name: str, depth: int = 0) -> None:
        if depth > 40:  # a hard-link cycle can only come from a broken tar
            return
        parts = name.split("/") if name else []
        for k in range(len(parts)):  # "" (root), then each parent, top-down
            for i in by_name.get("/".join(parts[:k]), ()):
                if i not in taken:
                    taken.add(i)
                    moved.append(i)
        for i in by_name.get(name, ()):
            if i not in taken:
                taken.add(i)
                if hardlinks[i]:
                    move(_lenient_clean(hardlinks[i]), depth + 1)
                moved.append(i)

    for wanted in prioritized:
        name = _lenient_clean(wanted)
        if name in by_name:
            move(name)
    rest = [i for i in range(len(names)) if i not in taken]
    return moved + rest, len(moved)


def _skipped(info: tarfile.TarInfo) -> bool:
    """Entries we write ourselves, so copies from a previous conversion go."""
    return _lenient_clean(info.name) in (TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK)


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
                    if not _skipped(info):
                        writer.add(info, tf.extractfile(info) if info.isreg() else None)
            else:
                _write_reordered(writer, tf, prioritized)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise FormatError(f"input is not a readable tar stream: {e}") from None
    return writer.finish()


def reordered_members(tf: tarfile.TarFile, prioritized: Sequence[str]):
    """Yield ``(info, payload or None, prioritized?)`` with the prioritized entries first.

    Reordering needs the whole stream, so payloads are spooled to a temporary
    file (memory stays bounded) and each is handed out positioned at its
    start. Shared by the eStargz and zstd:chunked writers.
    """
    with tempfile.SpooledTemporaryFile(max_size=16 << 20) as spool:
        members: list[tuple[tarfile.TarInfo, int]] = []  # (header, payload offset in spool)
        for info in tf:
            if _skipped(info):
                continue
            start = spool.tell()
            if info.isreg():
                source = tf.extractfile(info)
                while piece := source.read(_COPY_PIECE):
                    spool.write(piece)
            members.append((info, start))
        names = [info.name for info, _ in members]
        links = [info.linkname if info.islnk() else "" for info, _ in members]
        order, n_first = prefetch_order(names, links, prioritized)
        for position, i in enumerate(order):
            info, start = members[i]
            spool.seek(start)
            yield info, (spool if info.isreg() else None), position < n_first


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
