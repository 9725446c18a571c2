"""The TOC entry vocabulary eStargz and zstd:chunked share, read and written.

Both formats list a layer's entries as the same JSON objects (name, type,
mode, modtime, xattrs, chunk fields): the reader half checks such an object
field by field and turns it into a ``toc.Entry``; the writer half turns a tar
header into the PAX header we emit and the JSON entry that describes it. The
limits on a hostile TOC and the annotations both formats put on a layer are
here too, so neither format module imports the other.
"""

from __future__ import annotations

import base64
import copy
import datetime as _dt
import functools
import hashlib
import posixpath
import re
import tarfile
from typing import BinaryIO, Callable

from als.digest import is_sha256
from als.errors import FormatError
from als.formats import toc

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
CHUNK = "chunk"  # TOC entry type continuing the preceding regular file

COPY_PIECE = 1 << 20  # how much file payload a writer holds in memory at once
MAX_INT64 = (1 << 63) - 1
_MAX_NAME_COMPONENT = 255  # NAME_MAX, in bytes
_MAX_PATH = 4095  # PATH_MAX less its NUL: no extractor could create a longer name or symlink target
_MAX_XATTR_VALUE = 65536  # XATTR_SIZE_MAX: no file system takes a larger value
_NO_ID = (1 << 32) - 1  # (uid_t)-1
_MAX_MAJOR, _MAX_MINOR = (1 << 12) - 1, (1 << 20) - 1
# Limits that keep a hostile TOC's cost bounded. A chunk is held in memory
# whole (inflated, plus its compressed range), so both are capped; sgz writes
# 4 MiB chunks. MAX_TOC_ENTRIES bounds the objects a TOC turns into.
MAX_CHUNK = 32 << 20  # innerOffset + size of one chunk, uncompressed
MAX_CHUNK_SPAN = 64 << 20  # compressed bytes fetched for one chunk
MAX_TOC_ENTRIES = 1 << 20

_RFC3339_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


# --------------------------------------------------------------------------
# Reading: checked JSON entries
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
        if kind is None or (type(value) is kind and (kind is not int or 0 <= value <= MAX_INT64)):
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
    if len(name) <= _MAX_NAME_COMPONENT and name.isascii() and "\x00" not in name:
        # Most names (``./usr/bin/x``, ``./usr/lib/``) are clean but for a leading "./" and a
        # trailing "/": take those off and, if nothing is left that normpath would change
        # (an empty, "." or ".." component), that is the cleaned name, at a third of the cost.
        plain = name[2:] if name.startswith("./") else name
        if plain.endswith("/"):
            plain = plain[:-1]
        if not plain or not (plain[0] in "./" or plain[-1] == "/" or "//" in plain or "/." in plain):
            return plain
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


def climbs(name: str) -> bool:
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


def check_digest(value: str, what: str) -> None:
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
        check_digest(digest, f"{_where(index, name)}: digest")
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



# --------------------------------------------------------------------------
# Writing: tar headers to JSON entries
# --------------------------------------------------------------------------


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
    ``COPY_PIECE`` bytes, whatever the chunk size. Shared with the
    zstd:chunked writer.
    """
    chunk_sum = hashlib.sha256()
    left = length
    while left:
        piece = payload.read(min(left, COPY_PIECE)) if payload is not None else b""
        if not piece:
            raise FormatError(f"tar entry {name!r} ends before its {size} bytes")
        write(piece)
        chunk_sum.update(piece)
        whole.update(piece)
        left -= len(piece)
    return "sha256:" + chunk_sum.hexdigest()

