"""The format-neutral table of contents every layer format is parsed into.

eStargz and zstd:chunked describe files and chunks differently (next-offset
versus end-offset, gzip members versus zstd frames). Parsers normalise both
into these classes so the layer view and the chunk reader never look at a
format's JSON again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from als.errors import FormatError

# Entry types, as both formats spell them.
DIR = "dir"
REG = "reg"
SYMLINK = "symlink"
HARDLINK = "hardlink"
CHAR = "char"
BLOCK = "block"
FIFO = "fifo"
ENTRY_TYPES = frozenset({DIR, REG, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO})

# Compression of the byte ranges a Chunk points at.
GZIP = "gzip"
ZSTD = "zstd"
GZIP_SPANS = "gzip-spans"  # an ordinary gzip stream cut at checkpoints by an index (formats/gzindex.py)


@dataclass(frozen=True, eq=False, slots=True)
class Span:
    """A stretch of one deflate stream that inflates on its own, from a checkpoint a gzip index recorded.

    Its compressed bytes start at bit ``bit`` (LSB first) of the chunk's
    ``blob_start`` byte; inflating them needs the 32 KiB of uncompressed data
    before it (``window``, kept raw-deflate compressed). ``digest`` is the whole span's (``size``
    bytes), which `als index` checks; the store serves each chunk once it matches its own digest.
    Compared by identity: every chunk of the span holds the same object.
    """

    bit: int
    window: bytes
    size: int
    digest: str


@dataclass(frozen=True, slots=True)
class Chunk:
    """One verifiable piece of a regular file.

    ``blob_start``/``blob_end`` bound the compressed bytes to fetch; after
    decompressing them, ``inner_offset`` bytes are skipped and ``size`` bytes
    are the chunk, whose sha256 must equal ``digest``. ``zeros`` marks a chunk
    that is all zero bytes and needs no fetch (zstd:chunked).
    """

    # Built positionally by the parsers, like Entry: append new fields, do not reorder.
    offset: int  # position of the chunk within the file
    size: int  # uncompressed length
    blob_start: int
    blob_end: int  # exclusive
    digest: str  # "sha256:<hex>" of the uncompressed chunk
    inner_offset: int = 0
    zeros: bool = False
    span: Span | None = None  # gzip index: inflated from this checkpoint, then ``inner_offset`` skipped


@dataclass(slots=True)
class Entry:
    """One file system entry of a layer, as the tar stream had it.

    ``name`` is cleaned (no leading "/" or "./", no "..", root is ""). Whiteout
    and opaque markers (``.wh.*``) are kept as the tar has them: turning them
    into overlay form is the layer view's job, because it is an overlay
    concern, not a format one.
    """

    # The parsers build entries positionally (it is their hot loop): append new fields, do not reorder.
    name: str
    type: str
    mode: int = 0  # permission bits including setuid, setgid and sticky (0o7777)
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0  # seconds since the epoch, negative before 1970
    linkname: str = ""  # symlink target, or the cleaned name a hard link points at
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str = ""  # "sha256:<hex>" of the whole content, regular files only
    chunks: list[Chunk] = field(default_factory=list)
    mtime_nsec: int = 0  # the nanoseconds of mtime


@dataclass(slots=True)
class TOC:
    """A parsed, verified table of contents."""

    entries: list[Entry]
    digest: str  # the TOC digest the manifest annotation vouches for
    compression: str  # GZIP, ZSTD or GZIP_SPANS: how Chunk byte ranges are compressed
    data_end: int  # offset where file data ends (start of the TOC): blob bytes beyond it hold no chunk
    # Entries the parser accepted only after confining them (a name climbing out with ".."),
    # in operator words: the store logs them with the layer's name.
    warnings: list[str] = field(default_factory=list)
    # zstd:chunked only: the sha256 of the compressed tar-split this TOC vouches for ("" if none).
    tar_split_digest: str = ""


def entry_list(doc: object, what: str, max_entries: int) -> list:
    """The raw ``entries`` of a version 1 TOC document (eStargz TOC or zstd:chunked manifest).

    Every entry becomes objects of ours (about 1.2 KiB each once in a layer's
    tree), so their number is refused past ``max_entries`` before any is built.
    """
    if not isinstance(doc, dict):
        raise FormatError(f"{what} JSON is not an object")
    version = doc.get("version")
    if type(version) is not int or version != 1:
        raise FormatError(f"unsupported {what} version {version!r:.40} (want 1)")
    items = doc.get("entries", [])
    if not isinstance(items, list):
        raise FormatError(f"{what} 'entries' is not a list")
    if len(items) > max_entries:
        raise FormatError(f"{what} has {len(items)} entries, over the limit of {max_entries}")
    return items


def check_coverage(entry: Entry, chunks: list[Chunk]) -> None:
    """Refuse chunks (sorted by file offset) that do not tile ``entry``'s content exactly.

    A gap would read as data nobody vouched for and an overlap as two
    different answers for the same bytes, whichever format listed them.
    """
    position = 0
    for chunk in chunks:
        if chunk.offset != position:
            kind = "gap" if chunk.offset > position else "overlap"
            raise FormatError(f"regular file {entry.name!r:.300}: chunks {kind} at file offset {position}")
        position += chunk.size
    if position != entry.size:
        raise FormatError(f"regular file {entry.name!r:.300}: chunks cover {position} bytes of {entry.size}")
