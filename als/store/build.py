"""A resolved image's layer, built from its descriptor: its TOC found, verified and parsed, its tree, its chunk source.

The TOC is read once from the registry and saved in the state directory, so
a layer rebuilt later (after eviction, or after a restart) asks the registry
for nothing. A layer whose TOC cannot be verified, whose exact diff size is
unknown, or whose tree cannot be presented faithfully over FUSE is refused
here with a FormatError: the store declines it and Podman pulls it normally.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from als.config import Config
from als.digest import is_sha256
from als.errors import FormatError, NotFoundError, RegistryError
from als.fetch.fetcher import ChunkFetcher
from als.fetch.front import FrontRead
from als.fetch.source import BlobSource
from als.formats import lazy
from als.layer.resolved import Layer, LayerDescriptor
from als.layer.view import MAX_LAYER_NODES, LayerView
from als.oci import GZIP_INDEX_ANNOTATION
from als.reference import parse_reference
from als.registry.client import RegistryClient
from als.store.early import EarlyReads
from als.store.state import StateDir
from als.store.warm import prefetch_chunks, prefetch_end

log = logging.getLogger("als.store")

# TOC parsing is pure Python under the GIL: running more at once gains no speed but multiplies
# peak memory, which a hostile TOC can push to ~25x its size. Two slots let a small layer pass a big one.
_PARSE_SLOTS = threading.BoundedSemaphore(2)
_gc_lock = threading.Lock()
_gc_pausers = 0  # builds running with the cyclic garbage collector paused
_gc_resume = False  # whether the first of them found it enabled


@contextmanager
def gc_paused():
    """Pause the cyclic garbage collector while a layer is built.

    A TOC parse and its tree allocate tens of thousands of objects that all
    stay alive, and each allocation threshold crossed makes the collector
    walk them (and every tree already built) again for nothing: on the
    benchmark's 8,233-entry layer that was 10-80 ms of a 100-180 ms build.
    Reference counting still frees what the build drops.
    """
    global _gc_pausers, _gc_resume
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_resume = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_resume:
                gc.enable()


MAX_REFERRED_TRIES = 3  # gzip indexes that referrers name for one layer tried at most
MAX_EARLY = 16  # layers of a manifest whose gzip index is fetched ahead of their resolution
# The most of a layer's prioritised front read before its tree is built (FrontRead), held in memory
# until its prefetch is over; the rest of a longer front is fetched by the prefetch itself.
EARLY_FRONT = 8 << 20

# Layer blob digest -> gzip index digests (store/referred.py), asked once per image resolution.
Referred = Callable[[], dict[str, list[str]]]


@dataclass(frozen=True)
class Evicted:
    """What the rebuild of an evicted layer reuses: its diff size (zstd:chunked may have computed
    it with registry reads) and its layer id (its files keep their inode numbers)."""

    diff_size: int
    layer_id: int


@dataclass
class LayerBuilder:
    """Builds servable layers, each with its layer id (the state directory's id of its image and blob
    digest), which places its inode numbers apart from every other layer's."""

    config: Config
    client: RegistryClient
    fetcher: ChunkFetcher
    state: StateDir
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    early: EarlyReads = field(default_factory=EarlyReads, init=False, repr=False)
    # Layers built while their image's config is fetched (prebuild): (ref, digest) -> (desc, future)
    _prepared: dict = field(default_factory=dict, init=False, repr=False)
    # As many at once as TOCs may be parsed at once (_PARSE_SLOTS).
    _prebuilds: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="als-prebuild"),
        init=False, repr=False)
    # Optimized layers' fronts (FrontRead), apart from the early reads: a long front must not hold
    # up another layer's tail, which a pull waits on.
    _fronts: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=4, thread_name_prefix="als-front"),
        init=False, repr=False)
    # Whether a layer looked up before its image's manifest is in has its tail read at once
    # (guess_tail): on until a guess is wrong, which costs one read of tail_size bytes.
    guessing: bool = field(default=True, init=False, repr=False)

    def guess_tail(self, ref: str, digest: str, manifest: Future) -> None:
        """Read the tail of blob ``digest`` now, before the manifest says what the layer is: the
        first read of an eStargz layer's build, if it is one and named by its blob digest. Not
        once ``manifest`` (the image's resolution) is done: its builds read what they need."""
        if not self.guessing or manifest.done():
            return
        r = parse_reference(ref)

        def read_tail(length: int) -> tuple[int, bytes] | None:
            try:
                return self.client.read_tail(r, digest, length)
            except NotFoundError:  # named by its TOC digest (Podman >= 5.1), say: not a blob
                self._stop_guessing(f"image {ref} has no blob {digest}")
                raise

        self.early.start_tail((ref, digest), lazy.ESTARGZ.tail_length(self._toc_context()), read_tail)

    def read_ahead(self, ref: str, digest: str, size: int, media_type: str, annotations: dict) -> bool:
        """Start the first read a build of this layer will make (its TOC's bytes), as soon as the
        image manifest describes the layer; whether one is under way. Nothing is checked here:
        the build does that, and reads again if this read failed."""
        fmt = lazy.format_for(media_type, annotations)
        where = fmt.first_read(size, annotations, self._toc_context()) if fmt is not None else None
        guessed = self.early.tail_length((ref, digest))
        if guessed:
            if where is not None and where == (size - min(size, guessed), size):
                return True  # the tail guessed before the manifest was in is the read it needs
            self.early.discard((ref, digest))
            self._stop_guessing(f"image {ref} layer {digest} is not read from its tail first")
        if where is None:
            return False
        self.early.start((ref, digest), *where, partial(self.client.read_range, parse_reference(ref), digest))
        return True

    def _stop_guessing(self, why: str) -> None:
        if self.guessing:
            self.guessing = False
            log.info("layers looked up before their image's manifest is in are no longer read ahead: %s", why)

    def _read_range(self, ref: str, digest: str):
        """Reads of the layer's blob, the first of which may have been started already (read_ahead)."""
        plain = partial(self.client.read_range, parse_reference(ref), digest)

        def read_range(start: int, end: int) -> bytes:
            early = self.early.take((ref, digest), start, end)
            return early if early is not None else plain(start, end)
        return read_range

    def prebuild(self, ref: str, desc: LayerDescriptor) -> None:
        """Build layer ``desc`` now, before its image's config is in: ``desc`` lacks its DiffID,
        which only the config gives and only ``info`` needs. ``build`` takes the result. Not a
        gzip-indexed layer: its index must name the DiffID, so it waits for the config."""
        if lazy.format_for(desc.media_type, desc.annotations) in (None, lazy.GZIP_INDEX):
            return
        with self._lock:
            if (ref, desc.digest) in self._prepared:
                return
            try:
                self._prepared[(ref, desc.digest)] = (desc, self._prebuilds.submit(self._build_paused, ref, desc))
            except RuntimeError:  # shut down
                pass

    def forget_prebuilt(self, ref: str, keep: set[str]) -> None:
        """Drop the layers of ``ref`` built ahead but those in ``keep``: nobody will take them."""
        with self._lock:
            gone = [k for k in self._prepared if k[0] == ref and k[1] not in keep]
            futures = [self._prepared.pop(k)[1] for k in gone]
        for fut in futures:
            fut.cancel()

    def close(self) -> None:
        self._prebuilds.shutdown(wait=False, cancel_futures=True)
        self._fronts.shutdown(wait=False, cancel_futures=True)
        self.early.close()

    def fetch_indexes_early(self, ref: str, manifest: dict) -> None:
        """Start fetching the gzip indexes the image's manifest names, beside its config's fetch.

        An index is a blob of its own, found only once the layer is looked
        up; fetched here, it is in by the time the config is, a round trip
        and its transfer off the pull. Only a hint: the layer's resolution
        checks what it takes (``open_toc``), and fetches it itself if this failed.
        """
        layers = manifest.get("layers") if isinstance(manifest, dict) else None
        if not isinstance(layers, list):
            return
        r = parse_reference(ref)
        for layer in layers[:MAX_EARLY]:
            annotations = layer.get("annotations") if isinstance(layer, dict) else None
            if not isinstance(annotations, dict) or not lazy.GZIP_INDEX.claims(layer.get("mediaType", ""),
                                                                                annotations):
                continue
            digest = annotations.get(GZIP_INDEX_ANNOTATION)
            if is_sha256(digest) and self.state.get_toc(digest) is None:
                self.early.start_blob((ref, digest), partial(self.client.get_blob, r, digest,
                                                             self.config.resolve.max_toc_size))

    def _read_blob(self, ref: str, digest: str, max_size: int) -> bytes:
        """A blob of the image's repository (a gzip index): the early fetch's, if it started one and it worked."""
        data = self.early.take_blob((ref, digest))
        if data is not None and len(data) <= max_size:
            return data
        return self.client.get_blob(parse_reference(ref), digest, max_size)

    def build(self, ref: str, desc: LayerDescriptor, evicted: Evicted | None = None,
              referred: Referred | None = None) -> Layer:
        """Layer ``desc`` of image ``ref`` (or the rebuild of an ``evicted`` one, with its layer id).

        ``referred`` gives the gzip indexes its image's referrers name, by
        layer blob digest: asked only for a gzip layer with no TOC annotation.
        """
        if evicted is None:
            with self._lock:
                prepared = self._prepared.pop((ref, desc.digest), None)
            if prepared is not None and dataclasses.replace(desc, diff_id="") == prepared[0]:
                try:
                    layer = prepared[1].result()  # a failure is this build's: raised as it would be
                except CancelledError:
                    pass
                else:
                    return dataclasses.replace(layer, desc=desc)
        return self._build_paused(ref, desc, evicted, referred)

    def _build_paused(self, ref: str, desc: LayerDescriptor, evicted: Evicted | None = None,
                      referred: Referred | None = None) -> Layer:
        with gc_paused():
            return self._build(ref, desc, evicted, referred)

    def _build(self, ref: str, desc: LayerDescriptor, evicted: Evicted | None, referred: Referred | None) -> Layer:
        r = parse_reference(ref)
        label = f"image {ref} layer {desc.digest}"
        known = evicted.diff_size if evicted is not None else None
        read_blob = partial(self._read_blob, ref)
        read_range = partial(self.client.read_range, r, desc.digest)
        stream = getattr(self.client, "stream_range", None)  # chunks decoded as they arrive, if it can
        front: FrontRead | None = None

        def front_found(end: int) -> None:  # its prefetch starts here, streamed (``FrontRead``)
            nonlocal front
            read = FrontRead(min(end, EARLY_FRONT))
            try:
                self._fronts.submit(read.run, partial(stream, r, desc.digest))
            except RuntimeError:  # closed: the store is stopping
                return
            front = read

        try:
            if referred is not None and lazy.plain_gzip(desc.media_type, desc.annotations):
                opened = self._open_referred(label, desc, self._read_range(ref, desc.digest), known, read_blob,
                                             referred)
            else:
                # A rebuilt layer's prefetch ran when it was first resolved.
                opened = self._open_toc(label, desc, self._read_range(ref, desc.digest), known, read_blob,
                                        front_found=front_found if evicted is None and stream else None)
        finally:
            self.early.discard((ref, desc.digest))  # taken, or not wanted after all
        toc, diff_size = opened.toc, opened.diff_size
        # kept in the state directory: the same inode numbers after eviction and after a restart
        layer_id = evicted.layer_id if evicted is not None else self.state.ids.layer(ref, desc.digest)
        for warning in toc.warnings[:20]:
            log.warning("%s: %s", label, warning)
        if len(toc.warnings) > 20:
            log.warning("%s: %d more TOC entries confined the same way", label, len(toc.warnings) - 20)
        prefetch_to = prefetch_end(toc, self.config.fetch.prefetch_size)
        with _PARSE_SLOTS:
            # The tree takes the entries as it goes (consume): they and it are never whole at once.
            view = LayerView(toc.entries, ino_base=layer_id << 32, label=label,
                             max_nodes=min(self.config.resolve.max_toc_entries + 65536, MAX_LAYER_NODES),
                             consume=True)
        if view.unservable:
            raise FormatError(f"it cannot be presented faithfully over FUSE ({len(view.unservable)} entries, "
                              f"first: {view.unservable[0]})")
        source = BlobSource(label, read_range, toc.compression, view.chunks(),
                            stream_range=partial(stream, r, desc.digest) if stream else None)
        if opened.tail:
            self.fetcher.absorb(source, opened.tail[:max(toc.data_end - opened.tail_start, 0)], opened.tail_start)
        return Layer(ref=ref, desc=desc, toc_digest=toc.digest, diff_size=diff_size, view=view, source=source,
                     prefetch=prefetch_chunks(source, prefetch_to), front=front,
                     layer_id=layer_id)

    # ---- finding and verifying the TOC, by format ------------------------------------
    def _open_toc(self, label: str, desc: LayerDescriptor, read_range, known_diff_size: int | None = None,
                  read_blob: lazy.ReadBlob | None = None, index_digest: str = "",
                  front_found: Callable[[int], None] | None = None) -> lazy.OpenedTOC:
        """The layer's verified TOC and exact diff size, through its format; declined if it has none.

        ``known_diff_size`` is one computed before (the layer is rebuilt after
        eviction); ``read_blob`` fetches another blob of the image's
        repository (a gzip layer's index); ``index_digest`` is a gzip index
        of the layer that a referrer of its image names; ``front_found``
        hears where an eStargz layer's prioritised front ends, as soon as its TOC is decoded.
        """
        fmt = lazy.GZIP_INDEX if index_digest else lazy.format_for(desc.media_type, desc.annotations)
        if fmt is None:
            raise FormatError(lazy.unserved_reason(desc.media_type))
        ctx = dataclasses.replace(self._toc_context(), read_blob=read_blob, layer_digest=desc.digest,
                                  layer_diff_id=desc.diff_id, index_digest=index_digest,
                                  front_found=front_found)
        return fmt.open_toc(label, desc.size, desc.annotations, read_range, ctx, known_diff_size)

    def _open_referred(self, label: str, desc: LayerDescriptor, read_range, known_diff_size: int | None,
                       read_blob: lazy.ReadBlob, referred: Referred) -> lazy.OpenedTOC:
        """A plain gzip layer's TOC from a gzip index its image's referrers name (the first that checks out)."""
        candidates = referred().get(desc.digest, [])[:MAX_REFERRED_TRIES]
        if not candidates:
            raise FormatError("no TOC annotation (plain gzip), and no referrer of its image names a gzip "
                              "index of it")
        problems = []
        for index_digest in candidates:
            try:
                opened = self._open_toc(label, desc, read_range, known_diff_size, read_blob, index_digest)
            except (FormatError, RegistryError) as e:
                problems.append(f"{index_digest}: {e}")
                continue
            log.info("%s: serving it through gzip index %s, which a referrer of its image names", label,
                     index_digest)
            return opened
        raise FormatError(f"no gzip index its image's referrers name checks out ({'; '.join(problems)})")

    def _toc_context(self) -> lazy.TOCContext:
        """The store's side of opening a TOC; ``_open_toc`` adds the layer's own part."""
        resolve = self.config.resolve
        return lazy.TOCContext(saved=self.state, log=log, max_toc_size=resolve.max_toc_size,
                               max_entries=resolve.max_toc_entries, tail_size=resolve.tail_size,
                               allow_unverified=resolve.allow_unverified, parse_slot=_PARSE_SLOTS)
