"""A resolved image's layer, built from its descriptor: its TOC found, verified and parsed, its tree, its chunk source.

The TOC is read once from the registry and saved in the state directory, so
a layer rebuilt later (after eviction, or after a restart) asks the registry
for nothing. A layer whose TOC cannot be verified, whose exact diff size is
unknown, or whose tree cannot be presented faithfully over FUSE is refused
here with a FormatError: the store declines it and Podman pulls it normally.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial

from als.config import Config
from als.errors import FormatError, VerificationError
from als.fetch.fetcher import BlobSource, ChunkFetcher
from als.formats import estargz, zstdchunked
from als.formats import toc as T
from als.layer.resolved import Layer, LayerDescriptor
from als.layer.view import LayerView
from als.oci import GZIP_LAYER_TYPES, ZSTD_LAYER_TYPES
from als.reference import parse_reference
from als.registry.client import RegistryClient
from als.store.state import StateDir
from als.store.warm import prefetch_chunks

log = logging.getLogger("als.store")

# TOC parsing is pure Python under the GIL: running more at once gains no speed but multiplies
# peak memory, which a hostile TOC can push to ~25x its size. Two slots let a small layer pass a big one.
_PARSE_SLOTS = threading.BoundedSemaphore(2)


@dataclass(frozen=True)
class Evicted:
    """What the rebuild of an evicted layer reuses: its diff size (zstd:chunked may have computed
    it with registry reads) and its layer id (its files keep their inode numbers)."""

    diff_size: int
    layer_id: int


@dataclass
class LayerBuilder:
    """Builds servable layers; owns the layer ids, which place each layer's inode numbers apart."""

    config: Config
    client: RegistryClient
    fetcher: ChunkFetcher
    state: StateDir
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _next_layer_id: int = field(default=1, init=False, repr=False)

    def build(self, ref: str, desc: LayerDescriptor, evicted: Evicted | None = None) -> Layer:
        """Layer ``desc`` of image ``ref`` (or the rebuild of an ``evicted`` one, with its layer id)."""
        r = parse_reference(ref)
        label = f"image {ref} layer {desc.digest}"
        read_range = partial(self.client.read_range, r, desc.digest)
        if desc.media_type in ZSTD_LAYER_TYPES:
            toc, diff_size = self._load_zstd_toc(label, desc, read_range,
                                                 evicted.diff_size if evicted is not None else None)
            tail, tail_start = b"", 0
        else:
            toc, diff_size, tail, tail_start = self._load_estargz_toc(label, desc, read_range)
        if evicted is not None:
            layer_id = evicted.layer_id
        else:
            with self._lock:
                layer_id = self._next_layer_id
                self._next_layer_id += 1
        for warning in toc.warnings[:20]:
            log.warning("%s: %s", label, warning)
        if len(toc.warnings) > 20:
            log.warning("%s: %d more TOC entries confined the same way", label, len(toc.warnings) - 20)
        with _PARSE_SLOTS:
            view = LayerView(toc.entries, ino_base=layer_id << 32, label=label,
                             max_nodes=self.config.resolve.max_toc_entries + 65536)
        if view.unservable:
            raise FormatError(f"it cannot be presented faithfully over FUSE ({len(view.unservable)} entries, "
                              f"first: {view.unservable[0]})")
        stream = getattr(self.client, "stream_range", None)  # chunks decoded as they arrive, if it can
        source = BlobSource(label, read_range, toc.compression, view.chunks(),
                            stream_range=partial(stream, r, desc.digest) if stream else None)
        if tail:
            self.fetcher.absorb(source, tail[:max(toc.data_end - tail_start, 0)], tail_start)
        return Layer(ref=ref, desc=desc, toc_digest=toc.digest, diff_size=diff_size, view=view, source=source,
                     prefetch=prefetch_chunks(toc, source, self.config.fetch.prefetch_size),
                     layer_id=layer_id)

    # ---- finding and verifying the TOC, by format ------------------------------------
    def _load_estargz_toc(self, label: str, desc: LayerDescriptor, read_range) -> tuple[T.TOC, int, bytes, int]:
        """An eStargz layer's verified TOC, its diff size, and the blob tail read to find the TOC."""
        if desc.media_type not in GZIP_LAYER_TYPES:
            raise FormatError(f"media type {desc.media_type or '(none)'} is not served lazily")
        toc_digest = desc.annotations.get(estargz.TOC_DIGEST_ANNOTATION, "")
        if not toc_digest and not self.config.resolve.allow_unverified:
            raise FormatError(f"no {estargz.TOC_DIGEST_ANNOTATION} annotation, so its TOC cannot be verified")
        try:
            diff_size = int(desc.annotations[estargz.UNCOMPRESSED_SIZE_ANNOTATION])
        except (KeyError, ValueError):
            raise FormatError(f"no valid {estargz.UNCOMPRESSED_SIZE_ANNOTATION} annotation, "
                              "so the exact diff size is unknown") from None
        toc, tail, tail_start = self._load_toc(label, desc, toc_digest, read_range)
        return toc, diff_size, tail, tail_start

    def _load_zstd_toc(self, label: str, desc: LayerDescriptor, read_range,
                       known_size: int | None = None) -> tuple[T.TOC, int]:
        """A zstd:chunked layer's verified TOC (located by its annotations) and its exact diff size.

        containers/storage needs the size exact, and Podman writes no
        annotation for it (see ``_zstd_diff_size``).
        ``known_size`` is one computed before (the layer is rebuilt after eviction).
        """
        if not zstdchunked.is_zstd_chunked(desc.annotations):
            raise FormatError("a zstd layer without zstd:chunked annotations is not served lazily")
        max_toc = self.config.resolve.max_toc_size
        max_entries = self.config.resolve.max_toc_entries
        loc = zstdchunked.locate(desc.annotations, desc.size, max_toc_size=max_toc)
        saved = self.state.get_toc(loc.checksum)
        toc = None
        if saved is not None:
            try:
                with _PARSE_SLOTS:
                    toc = zstdchunked.parse_manifest(saved[1], loc, max_entries=max_entries)
            except FormatError:
                log.warning("%s: saved TOC is unusable; reading it from the registry again", label)
        if toc is None:
            data = read_range(loc.offset, loc.offset + loc.length)
            with _PARSE_SLOTS:
                toc = zstdchunked.parse_manifest(data, loc, max_entries=max_entries)
            self.state.put_toc(loc.checksum, loc.offset, data)
        if known_size is not None:
            return toc, known_size
        return toc, self._zstd_diff_size(label, desc, toc, read_range)

    def _zstd_diff_size(self, label: str, desc: LayerDescriptor, toc: T.TOC, read_range) -> int:
        """The exact uncompressed size: from the annotation, else the tar-split, else the header frames.

        The tar-split (Podman >= 5 writes one) takes one range read; the
        header frames about one request per thousand files, so they are the
        fallback for layers without a usable tar-split (Podman 4.3.1's).
        """
        try:
            return int(desc.annotations[zstdchunked.UNCOMPRESSED_SIZE_ANNOTATION])
        except (KeyError, ValueError):
            pass
        t0 = time.monotonic()
        why = "it has no tar-split"
        if zstdchunked.TAR_SPLIT_POSITION_ANNOTATION in desc.annotations:
            try:
                where = zstdchunked.locate_tar_split(desc.annotations, desc.size, toc,
                                                     max_compressed=self.config.resolve.max_toc_size)
                data = read_range(where.offset, where.offset + where.length)
                file_bytes = sum(e.size for e in toc.entries if e.type == T.REG)
                size = zstdchunked.tar_split_size(data, where, file_bytes=file_bytes)
                log.info("%s: its uncompressed size, %d bytes, comes from its tar-split (%d bytes read) in %.2fs",
                         label, size, where.length, time.monotonic() - t0)
                return size
            except (FormatError, VerificationError) as e:
                why = f"its tar-split is unusable: {e}"
                log.warning("%s: %s", label, why)
        diff_size = zstdchunked.uncompressed_size(toc, read_range)
        log.info("%s: computed its uncompressed size, %d bytes, from its header frames in %.2fs (%s)",
                 label, diff_size, time.monotonic() - t0, why)
        return diff_size

    def _load_toc(self, label: str, desc: LayerDescriptor, toc_digest: str,
                  read_range) -> tuple[T.TOC, bytes, int]:
        """The verified TOC, and the blob tail read to find it (empty when the TOC was saved)."""
        max_toc = self.config.resolve.max_toc_size
        saved = self.state.get_toc(toc_digest) if toc_digest else None
        if saved is not None:
            try:
                with _PARSE_SLOTS:
                    return estargz.parse_toc(saved[1], toc_digest, toc_offset=saved[0], max_toc_size=max_toc,
                                             max_entries=self.config.resolve.max_toc_entries), b"", 0
            except FormatError:
                log.warning("%s: saved TOC is unusable; reading it from the registry again", label)
        size = desc.size
        tail_len = min(size, max(self.config.resolve.tail_size, estargz.FOOTER_SIZE))
        tail_start = size - tail_len
        tail = read_range(tail_start, size)
        toc_offset, footer_size = estargz.parse_footer(tail, size)
        member_end = size - footer_size
        if member_end - toc_offset > max_toc:
            raise FormatError(f"its TOC is {member_end - toc_offset} bytes compressed, over the {max_toc} limit")
        if toc_offset >= tail_start:
            member = tail[toc_offset - tail_start:member_end - tail_start]
        else:
            member = read_range(toc_offset, tail_start) + tail[:member_end - tail_start]
        with _PARSE_SLOTS:
            toc = estargz.parse_toc(member, toc_digest or None, toc_offset=toc_offset, max_toc_size=max_toc,
                                    max_entries=self.config.resolve.max_toc_entries)
        if toc_digest:
            self.state.put_toc(toc_digest, toc_offset, member)
        return toc, tail, tail_start
