"""The layer formats the store serves lazily, behind one interface chosen by media type.

A layer can be served lazily when its format lets a reader fetch its table
of contents first and then any chunk on its own: eStargz (the gzip media
types), zstd:chunked (the zstd media type with its manifest annotations), and
an ordinary gzip layer whose annotation names a seekable index of it (a
separate blob in the same repository, formats/gzindex.py).
The store asks ``format_for`` which one a layer is and opens its TOC through
it; the chunk reader decompresses chunks through ``for_compression``; `info`
takes containers/storage's compression number from it. Nothing outside
``als.formats`` needs to know how either format is laid out.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

from als.digest import is_sha256
from als.errors import FormatError, VerificationError
from als.formats import estargz, gzindex, toc, zstdchunked, zstdchunked_size
from als.oci import GZIP_INDEX_ANNOTATION, GZIP_LAYER_TYPES, ZSTD_LAYER_TYPES

ReadRange = Callable[[int, int], bytes]  # [start, end) of the compressed blob
ReadBlob = Callable[[str, int], bytes]  # (digest, max size): a whole blob of the layer's repository, verified


class SavedTOCs(Protocol):
    """Where verified TOC bytes outlive a layer (the store's state directory): parsing them again re-verifies."""

    def get_toc(self, toc_digest: str) -> tuple[int, bytes] | None: ...

    def has_toc(self, toc_digest: str) -> bool: ...

    def put_toc(self, toc_digest: str, toc_offset: int, member: bytes) -> None: ...


@dataclass(frozen=True)
class TOCContext:
    """What the store lends a format to open a layer's TOC: its saved TOCs, its log and its limits."""

    saved: SavedTOCs
    log: logging.Logger  # the store's: its lines keep the store's name
    max_toc_size: int
    max_entries: int
    tail_size: int  # eStargz: blob bytes read from its end in one request, to find the footer and TOC
    allow_unverified: bool = False  # eStargz: open a TOC no annotation vouches for
    parse_slot: AbstractContextManager = nullcontext()  # held while parsing (bounds the store's peak memory)
    read_blob: ReadBlob | None = None  # gzip index: fetches the index blob from the layer's repository
    layer_digest: str = ""  # gzip index: the layer's blob digest, which its index must name
    layer_diff_id: str = ""  # gzip index: the config's DiffID of the layer, which its index must name
    index_digest: str = ""  # gzip index: found through a referrer of the image, not in the annotations
    front_found: Callable[[int], None] | None = None  # eStargz: hears where the prioritised front ends, early


@dataclass
class OpenedTOC:
    """A layer's verified TOC and what the store records with it."""

    toc: toc.TOC
    diff_size: int  # the exact length of the layer's tar stream: containers/storage's diff-size
    tail: bytes = b""  # blob bytes read from ``tail_start`` to find the TOC: chunks in them need no fetch
    tail_start: int = 0


class LayerFormat(Protocol):
    """One lazily served format: how to recognise it, open its TOC and decompress its chunks."""

    name: str
    compression: str  # toc.GZIP or toc.ZSTD: how its chunks' byte ranges are compressed (toc.TOC.compression)
    storage_compression: int  # containers/storage's archive.Compression number, for `info`
    toc_digest_annotations: tuple[str, ...]  # the annotations naming its TOC digest, preferred first

    def claims(self, media_type: str, annotations: Mapping[str, str]) -> bool:
        """Whether a layer with this media type and these annotations is in this format."""

    def open_toc(self, label: str, size: int, annotations: Mapping[str, str], read_range: ReadRange,
                 ctx: TOCContext, known_diff_size: int | None = None) -> OpenedTOC:
        """Fetch (or take from ``ctx.saved``), verify and parse the TOC of a ``size``-byte blob.

        ``known_diff_size`` is one computed before (the layer is rebuilt after
        eviction). What the annotations lack, or the blob gets wrong, raises
        FormatError in words for the operator's log.
        """

    def first_read(self, size: int, annotations: Mapping[str, str], ctx: TOCContext) -> tuple[int, int] | None:
        """The blob range ``open_toc`` reads first, known from the descriptor alone; None when it
        reads nothing (a saved TOC) or declines the layer before reading."""

    def decompress_chunk(self, data: bytes | memoryview, chunk: toc.Chunk) -> bytes:
        """The chunk's bytes from its compressed range (the caller checks the digest)."""


class EStargz:
    """eStargz: gzip members, the TOC found through the blob's footer, the diff size from an annotation."""

    name = "eStargz"
    compression = toc.GZIP
    storage_compression = 2  # archive.Gzip
    toc_digest_annotations = (estargz.TOC_DIGEST_ANNOTATION,)
    decompress_chunk = staticmethod(estargz.decompress_chunk)

    def claims(self, media_type: str, annotations: Mapping[str, str]) -> bool:
        # A plain gzip layer is claimed too: open_toc declines it, saying which annotation it lacks.
        return media_type in GZIP_LAYER_TYPES

    def first_read(self, size: int, annotations: Mapping[str, str], ctx: TOCContext) -> tuple[int, int] | None:
        toc_digest = annotations.get(estargz.TOC_DIGEST_ANNOTATION, "")
        if not (toc_digest or ctx.allow_unverified) or (toc_digest and ctx.saved.has_toc(toc_digest)):
            return None
        return self.tail_range(size, ctx)

    @staticmethod
    def tail_length(ctx: TOCContext) -> int:
        """How many bytes at the blob's end are read first: the footer and, most often, the whole TOC."""
        return max(ctx.tail_size, estargz.FOOTER_SIZE)

    def tail_range(self, size: int, ctx: TOCContext) -> tuple[int, int]:
        """Those bytes of a ``size``-byte blob (all of it, if smaller)."""
        return size - min(size, self.tail_length(ctx)), size

    def open_toc(self, label: str, size: int, annotations: Mapping[str, str], read_range: ReadRange,
                 ctx: TOCContext, known_diff_size: int | None = None) -> OpenedTOC:
        toc_digest = annotations.get(estargz.TOC_DIGEST_ANNOTATION, "")
        if not toc_digest and GZIP_INDEX_ANNOTATION in annotations:
            raise FormatError(f"it names a gzip index in {GZIP_INDEX_ANNOTATION} but not in "
                              f"{estargz.TOC_DIGEST_ANNOTATION} too, as `als index` writes it")
        if not toc_digest and not ctx.allow_unverified:
            raise FormatError(f"no {estargz.TOC_DIGEST_ANNOTATION} annotation, so its TOC cannot be verified")
        try:
            diff_size = int(annotations[estargz.UNCOMPRESSED_SIZE_ANNOTATION])
        except (KeyError, ValueError):
            raise FormatError(f"no valid {estargz.UNCOMPRESSED_SIZE_ANNOTATION} annotation, "
                              "so the exact diff size is unknown") from None
        saved = ctx.saved.get_toc(toc_digest) if toc_digest else None
        if saved is not None:
            try:
                with ctx.parse_slot:
                    parsed = estargz.parse_toc(saved[1], toc_digest, toc_offset=saved[0],
                                               max_toc_size=ctx.max_toc_size, max_entries=ctx.max_entries)
                return OpenedTOC(parsed, diff_size)
            except FormatError:
                ctx.log.warning("%s: saved TOC is unusable; reading it from the registry again", label)
        tail_start, _ = self.tail_range(size, ctx)
        tail = read_range(tail_start, size)
        toc_offset, footer_size = estargz.parse_footer(tail, size)
        member_end = size - footer_size
        if member_end - toc_offset > ctx.max_toc_size:
            raise FormatError(f"its TOC is {member_end - toc_offset} bytes compressed, "
                              f"over the {ctx.max_toc_size} limit")
        if toc_offset >= tail_start:
            member = tail[toc_offset - tail_start:member_end - tail_start]
        else:
            member = read_range(toc_offset, tail_start) + tail[:member_end - tail_start]
        with ctx.parse_slot:
            parsed = estargz.parse_toc(member, toc_digest or None, toc_offset=toc_offset,
                                       max_toc_size=ctx.max_toc_size, max_entries=ctx.max_entries,
                                       on_front=ctx.front_found)
        if toc_digest:
            ctx.saved.put_toc(toc_digest, toc_offset, member)
        return OpenedTOC(parsed, diff_size, tail, tail_start)


class ZstdChunked:
    """zstd:chunked: zstd frames, the TOC located by annotations, the diff size computed if not annotated."""

    name = "zstd:chunked"
    compression = toc.ZSTD
    storage_compression = 4  # archive.Zstd
    toc_digest_annotations = zstdchunked.CHECKSUM_ANNOTATIONS
    decompress_chunk = staticmethod(zstdchunked.decompress_chunk)

    def claims(self, media_type: str, annotations: Mapping[str, str]) -> bool:
        return media_type in ZSTD_LAYER_TYPES and zstdchunked.is_zstd_chunked(annotations)

    def first_read(self, size: int, annotations: Mapping[str, str], ctx: TOCContext) -> tuple[int, int] | None:
        try:
            loc = zstdchunked.locate(annotations, size, max_toc_size=ctx.max_toc_size)
        except FormatError:
            return None  # open_toc says why
        if ctx.saved.has_toc(loc.checksum):
            return None
        return loc.offset, loc.offset + loc.length

    def open_toc(self, label: str, size: int, annotations: Mapping[str, str], read_range: ReadRange,
                 ctx: TOCContext, known_diff_size: int | None = None) -> OpenedTOC:
        loc = zstdchunked.locate(annotations, size, max_toc_size=ctx.max_toc_size)
        saved = ctx.saved.get_toc(loc.checksum)
        parsed = None
        if saved is not None:
            try:
                with ctx.parse_slot:
                    parsed = zstdchunked.parse_manifest(saved[1], loc, max_entries=ctx.max_entries)
            except FormatError:
                ctx.log.warning("%s: saved TOC is unusable; reading it from the registry again", label)
        if parsed is None:
            data = read_range(loc.offset, loc.offset + loc.length)
            with ctx.parse_slot:
                parsed = zstdchunked.parse_manifest(data, loc, max_entries=ctx.max_entries)
            ctx.saved.put_toc(loc.checksum, loc.offset, data)
        if known_diff_size is None:
            known_diff_size = self._diff_size(label, size, annotations, parsed, read_range, ctx)
        return OpenedTOC(parsed, known_diff_size)

    @staticmethod
    def _diff_size(label: str, size: int, annotations: Mapping[str, str], parsed: toc.TOC,
                   read_range: ReadRange, ctx: TOCContext) -> int:
        """The exact uncompressed size: from the annotation, else the tar-split, else the header frames.

        containers/storage needs the size exact, and Podman writes no
        annotation for it. The tar-split (Podman >= 5 writes one) takes one
        range read; the header frames about one request per thousand files,
        so they are the fallback for layers without a usable tar-split
        (Podman 4.3.1's).
        """
        try:
            return int(annotations[zstdchunked.UNCOMPRESSED_SIZE_ANNOTATION])
        except (KeyError, ValueError):
            pass
        t0 = time.monotonic()
        why = "it has no tar-split"
        if zstdchunked.TAR_SPLIT_POSITION_ANNOTATION in annotations:
            try:
                where = zstdchunked_size.locate_tar_split(annotations, size, parsed, max_compressed=ctx.max_toc_size)
                data = read_range(where.offset, where.offset + where.length)
                file_bytes = sum(e.size for e in parsed.entries if e.type == toc.REG)
                diff_size = zstdchunked_size.tar_split_size(data, where, file_bytes=file_bytes)
                ctx.log.info("%s: its uncompressed size, %d bytes, comes from its tar-split (%d bytes read) "
                             "in %.2fs", label, diff_size, where.length, time.monotonic() - t0)
                return diff_size
            except (FormatError, VerificationError) as e:
                why = f"its tar-split is unusable: {e}"
                ctx.log.warning("%s: %s", label, why)
        diff_size = zstdchunked_size.uncompressed_size(parsed, read_range)
        ctx.log.info("%s: computed its uncompressed size, %d bytes, from its header frames in %.2fs (%s)",
                     label, diff_size, time.monotonic() - t0, why)
        return diff_size


class GzipIndexed:
    """An ordinary gzip layer with a seekable index: spans inflated from checkpoints the index lists.

    The index is a blob of its own in the layer's repository, named by two
    layer annotations with the same value: the eStargz TOC key, the one
    Podman >= 5.1 asks the store by, and ours, which says that this "TOC" is
    a gzip index. A layer whose two disagree (a tool converted it to eStargz
    and kept ours, stale) is not claimed: it is eStargz, or declined. The
    index's digest is checked before it is read, and it must name this
    layer's blob and DiffID. An ordinary gzip layer with no annotation may
    have its index found through a referrer of its image instead
    (``TOCContext.index_digest``).
    """

    name = "gzip index"
    compression = toc.GZIP_SPANS
    storage_compression = 2  # archive.Gzip: the blob is the original gzip layer
    toc_digest_annotations = (estargz.TOC_DIGEST_ANNOTATION, GZIP_INDEX_ANNOTATION)
    decompress_chunk = staticmethod(gzindex.decompress_chunk)

    def first_read(self, size: int, annotations: Mapping[str, str], ctx: TOCContext) -> tuple[int, int] | None:
        return None  # the index is another blob: nothing of the layer's own is read first

    def claims(self, media_type: str, annotations: Mapping[str, str]) -> bool:
        ours = annotations.get(GZIP_INDEX_ANNOTATION)
        return media_type in GZIP_LAYER_TYPES and bool(ours) and annotations.get(estargz.TOC_DIGEST_ANNOTATION) == ours

    def open_toc(self, label: str, size: int, annotations: Mapping[str, str], read_range: ReadRange,
                 ctx: TOCContext, known_diff_size: int | None = None) -> OpenedTOC:
        index_digest = ctx.index_digest or annotations[GZIP_INDEX_ANNOTATION]
        layer_digest = ctx.layer_digest
        saved = ctx.saved.get_toc(index_digest) if is_sha256(index_digest) else None
        if saved is not None:
            try:
                with ctx.parse_slot:
                    parsed = self._parse(saved[1], index_digest, layer_digest, size, ctx)
                return OpenedTOC(parsed.toc, parsed.uncompressed_size)
            except FormatError:
                ctx.log.warning("%s: saved gzip index is unusable; reading it from the registry again", label)
        if ctx.read_blob is None:
            raise FormatError("its gzip index cannot be fetched here")
        if not is_sha256(index_digest):
            raise FormatError(f"{GZIP_INDEX_ANNOTATION} {index_digest!r:.100} is not a sha256 digest")
        blob = ctx.read_blob(index_digest, ctx.max_toc_size)
        with ctx.parse_slot:
            parsed = self._parse(blob, index_digest, layer_digest, size, ctx)
        ctx.saved.put_toc(index_digest, 0, blob)
        return OpenedTOC(parsed.toc, parsed.uncompressed_size)

    @staticmethod
    def _parse(blob: bytes, index_digest: str, layer_digest: str, size: int, ctx: TOCContext) -> gzindex.GzipIndex:
        return gzindex.parse_index(blob, index_digest, layer_digest=layer_digest, layer_size=size,
                                   max_size=ctx.max_toc_size, max_entries=ctx.max_entries,
                                   diff_id=ctx.layer_diff_id or None)


ESTARGZ = EStargz()
ZSTD_CHUNKED = ZstdChunked()
GZIP_INDEX = GzipIndexed()
FORMATS: tuple[LayerFormat, ...] = (ESTARGZ, ZSTD_CHUNKED, GZIP_INDEX)


def format_for(media_type: str, annotations: Mapping[str, str]) -> LayerFormat | None:
    """The format a layer is served lazily in, or None (the store declines it: see ``unserved_reason``)."""
    for fmt in (GZIP_INDEX, ESTARGZ, ZSTD_CHUNKED):  # an indexed gzip layer before eStargz's catch-all
        if fmt.claims(media_type, annotations):
            return fmt
    return None


def plain_gzip(media_type: str, annotations: Mapping[str, str]) -> bool:
    """Whether a layer is gzip with no TOC annotation of any format: its index may be found through a
    referrer of its image (a layer with a TOC needs none, and is never worth the request)."""
    return media_type in GZIP_LAYER_TYPES and not toc_digest(annotations)


def unserved_reason(media_type: str) -> str:
    """Why a layer ``format_for`` finds no format for is not served lazily, for the operator's log."""
    if media_type in ZSTD_LAYER_TYPES:
        return "a zstd layer without zstd:chunked annotations is not served lazily"
    return f"media type {media_type or '(none)'} is not served lazily"


def for_compression(compression: str) -> LayerFormat | None:
    """The format whose chunks are compressed as ``compression`` says (a toc.TOC's ``compression``)."""
    for fmt in FORMATS:
        if fmt.compression == compression:
            return fmt
    return None


def toc_digest(annotations: Mapping[str, str]) -> str:
    """The TOC digest a layer's annotations name, in any format (eStargz first), or ""."""
    for fmt in FORMATS:
        for key in fmt.toc_digest_annotations:
            if key in annotations:
                return annotations[key]
    return ""
