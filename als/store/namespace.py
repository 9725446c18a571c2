"""The additional layer store: images, their layers, `info` and use counts (`blob` is in als/store/blob.py).

This is the ALS protocol with no FUSE in it. The first lookup under an image
reference resolves the image once (manifest, config) and starts resolving all
of its layers in parallel, because containers/image looks layers up one at a
time under a lock: by the time it asks for the second layer, it is ready.
Every wait is bounded; a layer that cannot be served lazily is *declined*
(the FUSE adapter answers EIO), and Podman pulls it normally.

A resolved layer's tree costs about 1.5 KiB of memory per TOC entry, so the
store keeps at most ``resolve.max_idle_layers`` layers that no container uses
(containers/storage's `use` count), dropping the least recently looked up
first. Their TOCs stay in the state directory: a later lookup rebuilds the
layer from there, with the same inode numbers, without asking the registry.
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import logging
import platform
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from als.ops import metrics
from als.layer import startup
from als.layer.access import AccessRecorder
from als.config import Config
from als.store.consumer import Consumers
from als.errors import ALSError, BlockedError, FormatError, Interrupted, NotFoundError, RegistryError
from als.fetch.fetcher import BlobSource, ChunkFetcher
from als.oci import INDEX_TYPES, json_object
from als.formats import estargz, lazy
from als.formats import toc as T
from als.layer.resolved import Layer, LayerDescriptor
from als.layer.view import LayerView
from als.reference import parse_reference
from als.registry.client import RegistryClient
from als.store.state import StateDir
from als.wait import wait_for

log = logging.getLogger("als.store")

MAX_METADATA = 8 << 20  # largest manifest or config accepted
SAVED_GRACE = 5.0  # seconds a layer rebuilt from saved metadata may take, past a failed resolution
# TOC parsing is pure Python under the GIL: running more at once gains no speed but multiplies
# peak memory, which a hostile TOC can push to ~25x its size. Two slots let a small layer pass a big one.
_PARSE_SLOTS = threading.BoundedSemaphore(2)


class LayerUnavailable(ALSError):
    """A lookup the store answers with an errno: ENOENT (no such layer) or EIO (declined)."""

    def __init__(self, err: int, message: str, transient: bool = False):
        super().__init__(message)
        self.errno = err
        self.transient = transient  # the cause may pass (registry trouble): retried after failure_ttl


@dataclass
class Image:
    ref: str
    manifest_digest: str
    layers: list[LayerDescriptor]
    entrypoint: list[str] = field(default_factory=list)  # where its default program may be (startup.py)

    def find(self, digest: str) -> LayerDescriptor | None:
        """The layer named by a compressed digest (Podman < 5.1) or a TOC digest (Podman >= 5.1)."""
        for d in self.layers:
            if digest in (d.digest, d.toc_digest):
                return d
        return None


@dataclass(frozen=True)
class _Evicted:
    """What the rebuild of an evicted layer reuses: its diff size (zstd:chunked may have computed
    it with registry reads) and its layer id (its files keep their inode numbers)."""

    diff_size: int
    layer_id: int


@dataclass
class _Resolution:
    """One resolution of an image reference; replaced when its TTL runs out."""

    started: float
    image: Future = field(default_factory=Future)  # -> Image
    layers: dict[str, Future] = field(default_factory=dict)  # blob digest -> Future[Layer]
    # blob digest -> an evicted layer of this image: it has no future until it is looked up again
    evicted: dict[str, _Evicted] = field(default_factory=dict)

    def has_layer(self, digest: str) -> bool:
        """Whether the image resolved to a manifest naming this blob."""
        image = self.image
        return (image.done() and image.exception() is None
                and any(d.digest == digest for d in image.result().layers))

    def failed_transiently(self) -> bool:
        """Whether the image or one of its layers failed for a reason that may pass by now."""
        return any(f.done() and getattr(f.exception(), "transient", False)
                   for f in (self.image, *self.layers.values()))


@functools.lru_cache(maxsize=1024)
def decode_ref(name: str) -> str | None:
    """The image reference a top-level directory name encodes (std base64), or None."""
    try:
        ref = base64.b64decode(name.encode("ascii"), validate=True).decode("utf-8")
        parse_reference(ref)
    except (ValueError, binascii.Error, UnicodeError):
        return None
    return ref


def host_platform() -> tuple[str, str, str]:
    machine = platform.machine().lower()
    arch, variant = {"x86_64": ("amd64", ""), "amd64": ("amd64", ""), "aarch64": ("arm64", "v8"),
                     "arm64": ("arm64", "v8"), "armv7l": ("arm", "v7"), "ppc64le": ("ppc64le", ""),
                     "s390x": ("s390x", "")}.get(machine, (machine, ""))
    return "linux", arch, variant


class Store:
    def __init__(self, config: Config, client: RegistryClient, fetcher: ChunkFetcher, state: StateDir):
        self.config = config
        self.client = client
        self.fetcher = fetcher
        self.state = state
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="als-resolve")
        self._warmers = ThreadPoolExecutor(max_workers=max(config.fetch.background_layers, 1),
                                           thread_name_prefix="als-background")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._resolutions: dict[str, _Resolution] = {}
        self._layers: dict[tuple[str, str], Layer] = {}  # (ref, digest or TOC digest) -> Layer
        self._recent: OrderedDict[tuple[str, str], Layer] = OrderedDict()  # (ref, blob digest), LRU first
        # Called with (ref, digest) for each name of an evicted layer, after it is evicted (outside
        # the store's lock): whoever caches its entries (the kernel, through the FUSE layer) drops them.
        self.on_evict: list[Callable[[str, str], None]] = []
        self._fallbacks: dict[str, _Resolution] = {}  # ref -> image rebuilt from saved metadata
        self._uses: dict[tuple[str, str], int] = {}
        self._next_layer_id = 1
        self.accesses = AccessRecorder()  # `als optimize` switches it on through the control socket
        # The engines asking for layers (the FUSE layer reports each request's caller pid), to warn about
        # a containers/storage that loses lazily pulled layers.
        self.consumers = Consumers()
        self.predictor = (startup.Predictor(fetcher, config.fetch.prefetch_request)
                          if config.fetch.predict else None)
        if config.resolve.platform:
            parts = config.resolve.platform.split("/")
            self._platform = (parts[0], parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else "")
        else:
            self._platform = host_platform()

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._warmers.shutdown(wait=False, cancel_futures=True)
        if self.predictor is not None:
            self.predictor.close()
        self.consumers.close()

    # ---- the ALS protocol -------------------------------------------------------------
    def prepare(self, ref: str) -> None:
        """Start resolving ``ref`` in the background (called on the first lookup under it)."""
        self._resolution(ref)

    def ready_layer(self, ref: str, digest: str) -> Layer | None:
        """The layer if it is resolved already: what a caller that must not wait asks first."""
        with self._lock:
            layer = self._layers.get((ref, digest))
            if layer is not None:
                self._recent.move_to_end((ref, layer.desc.digest))
            return layer

    def layer(self, ref: str, digest: str, cancel: threading.Event | None = None) -> Layer:
        """The servable layer ``digest`` of image ``ref``, waiting at most the resolve timeout.

        ``cancel``: the caller went away (a FUSE interrupt): stop waiting, raise Interrupted.
        """
        layer = self.ready_layer(ref, digest)
        if layer is not None:
            return layer
        with self._lock:
            fallback = self._fallbacks.get(ref)
        deadline = time.monotonic() + self.config.resolve.timeout
        desc = fallback.image.result().find(digest) if fallback is not None else None
        if desc is not None:
            # An earlier lookup found the registry away and served this image from saved
            # metadata: its other layers come from there too, without waiting for it again.
            res = fallback
        else:
            desc, res, deadline = self._from_registry(ref, digest, deadline, cancel)
        layer = self._wait(self._layer_future(res, desc), deadline, f"image {ref} layer {digest}", cancel)
        self._keep(layer)
        return layer

    def _layer_future(self, res: _Resolution, desc: LayerDescriptor) -> Future:
        """The resolution's future of layer ``desc``; an evicted layer's rebuild starts here."""
        with self._lock:
            fut = res.layers.get(desc.digest)
            if fut is not None:
                return fut
            fut = res.layers[desc.digest] = Future()
            evicted = res.evicted.pop(desc.digest, None)
        image = res.image.result()  # done: desc was found in it
        self._pool.submit(self._run_layer, image.ref, desc, fut, image.entrypoint, evicted)
        return fut

    def _from_registry(self, ref: str, digest: str, deadline: float,
                       cancel: threading.Event | None) -> tuple[LayerDescriptor, _Resolution, float]:
        """The layer's descriptor from the image's current resolution, or from saved metadata."""
        res = self._resolution(ref)
        try:
            image = self._wait(res.image, deadline, f"image {ref}", cancel)
        except LayerUnavailable as e:
            # The registry is down or the tag is gone: Podman's graph root still names this
            # layer (after a restart, say), and what we saved of it is enough to serve it.
            found = self._from_saved(ref, digest)
            if found is None:
                raise
            log.warning("image %s layer %s: serving it from saved metadata: %s", ref, digest, e)
            with self._lock:
                self._fallbacks[ref] = found[1]
            return found[0], found[1], max(deadline, time.monotonic() + SAVED_GRACE)
        desc = image.find(digest)
        if desc is None:
            desc, res = self._find_elsewhere(ref, digest, res, cancel)
        return desc, res, deadline

    def use(self, ref: str, digest: str) -> None:
        with self._lock:
            n = self._uses[(ref, digest)] = self._uses.get((ref, digest), 0) + 1
        log.info("image %s layer %s: in use (%d)", ref, digest, n)

    def release(self, ref: str, digest: str) -> None:
        with self._lock:
            n = self._uses.get((ref, digest), 0)
            if n <= 1:
                self._uses.pop((ref, digest), None)
                evicted = self._evict_over_bound()  # one more idle layer
            else:
                self._uses[(ref, digest)] = n - 1
                evicted = []
        log.info("image %s layer %s: released (%d)", ref, digest, max(n - 1, 0))
        self._after_eviction(evicted)

    def uses(self, ref: str, digest: str) -> int:
        return self._uses.get((ref, digest), 0)

    def refs(self) -> list[str]:
        """Image references looked up so far."""
        with self._lock:
            return list(self._resolutions)

    def layers(self) -> list[Layer]:
        """The layers held in memory, least recently looked up first."""
        with self._lock:
            return list(self._recent.values())

    # ---- keeping and evicting ---------------------------------------------------------
    def _keep(self, layer: Layer) -> None:
        """Hold ``layer`` as the most recently looked up, and evict what that puts over the bound."""
        ref, digest = layer.ref, layer.desc.digest
        with self._lock:
            self._recent[(ref, digest)] = layer
            self._recent.move_to_end((ref, digest))
            self._layers[(ref, digest)] = layer
            if layer.toc_digest:
                self._layers[(ref, layer.toc_digest)] = layer
            for res in self._held_by(ref):
                res.evicted.pop(digest, None)
            evicted = self._evict_over_bound()
        self._after_eviction(evicted)

    def _held_by(self, ref: str) -> list[_Resolution]:
        """The resolutions whose futures hold ``ref``'s layers for later lookups (lock held)."""
        return [r for r in (self._resolutions.get(ref), self._fallbacks.get(ref)) if r is not None]

    def _in_use(self, layer: Layer) -> bool:
        """containers/storage counts uses by the name it looked the layer up by (lock held)."""
        return any(self._uses.get((layer.ref, name), 0) > 0 for name in (layer.desc.digest, layer.toc_digest)
                   if name)

    def _evict_over_bound(self) -> list[Layer]:
        """Drop the least recently looked up unused layers past ``max_idle_layers`` (lock held).

        Layers in use are neither evicted nor counted: they stay whatever the
        bound, and a pull's other layers are not dropped before containers/storage
        has looked them up and counted its use.
        """
        bound = self.config.resolve.max_idle_layers
        if not bound:
            return []
        idle = [key for key, layer in self._recent.items() if not self._in_use(layer)]
        victims = []
        for ref, digest in idle[:max(len(idle) - bound, 0)]:
            layer = self._recent.pop((ref, digest))
            for name in (digest, layer.toc_digest):
                if name and self._layers.get((ref, name)) is layer:
                    del self._layers[(ref, name)]
            for res in self._held_by(ref):
                fut = res.layers.get(digest)
                if fut is None or (fut.done() and fut.exception() is None and fut.result() is layer):
                    res.layers.pop(digest, None)  # None: a lookup kept it after an earlier eviction
                    if res.has_layer(digest):
                        res.evicted[digest] = _Evicted(layer.diff_size, layer.layer_id)
            victims.append(layer)
        return victims

    def _after_eviction(self, evicted: list[Layer]) -> None:
        """Log evictions and tell ``on_evict`` about every name of each layer (outside the lock)."""
        for layer in evicted:
            log.info("image %s layer %s: dropped from memory, unused and least recently looked up (at most %d "
                     "unused layers are kept); it is rebuilt from saved metadata when looked up again",
                     layer.ref, layer.desc.digest, self.config.resolve.max_idle_layers)
            metrics.layer_evicted()
            for name in (layer.desc.digest, layer.toc_digest):
                if not name:
                    continue
                for hook in list(self.on_evict):
                    try:
                        hook(layer.ref, name)
                    except Exception:
                        log.exception("image %s layer %s: eviction hook failed", layer.ref, name)

    def resolutions(self) -> dict[str, _Resolution]:
        """The current resolution of each image reference looked up, for `als status`."""
        with self._lock:
            return dict(self._resolutions)

    # ---- resolution -------------------------------------------------------------------
    def _resolution(self, ref: str, *, fresh: bool = False) -> _Resolution:
        now = time.monotonic()
        with self._lock:
            res = self._resolutions.get(ref)
            age = now - res.started if res is not None else 0.0
            # A registry that was down must not pin a decline for the whole TTL.
            if res is not None and not fresh and age < self.config.resolve.ttl and not (
                    age >= self.config.resolve.failure_ttl and res.failed_transiently()):
                return res
            previous, res = res, _Resolution(started=now)
            self._resolutions[ref] = res
        self._pool.submit(self._run_resolution, ref, res, previous)
        return res

    def _run_resolution(self, ref: str, res: _Resolution, previous: _Resolution | None = None) -> None:
        t0 = time.monotonic()
        try:
            image = self._fetch_image(ref)
        except Exception as e:
            log.warning("image %s: cannot resolve: %s", ref, e)
            res.image.set_exception(_as_unavailable(e, f"image {ref}"))
            return
        self._start_layers(image, res, previous)
        res.image.set_result(image)
        log.info("image %s: resolved manifest %s (%d layers) in %.2fs", ref, image.manifest_digest,
                 len(image.layers), time.monotonic() - t0)

    def _start_layers(self, image: Image, res: _Resolution, previous: _Resolution | None = None) -> None:
        """Resolve every layer of ``image`` in parallel, but for those ``res`` need not build again.

        A layer held in memory is reused as it is (a tag resolved again after
        its TTL does not build a second tree of it), and one evicted since the
        ``previous`` resolution stays evicted until it is looked up.
        """
        start = []
        with self._lock:
            for desc in image.layers:
                kept = self._recent.get((image.ref, desc.digest))
                evicted = previous.evicted.get(desc.digest) if previous is not None else None
                if kept is not None and kept.desc == desc:
                    res.layers[desc.digest] = fut = Future()
                    fut.set_result(kept)
                elif evicted is not None:
                    res.evicted[desc.digest] = evicted
                else:
                    res.layers[desc.digest] = fut = Future()
                    start.append((desc, fut))
        for desc, fut in start:
            self._pool.submit(self._run_layer, image.ref, desc, fut, image.entrypoint)

    def _run_layer(self, ref: str, desc: LayerDescriptor, fut: Future, entrypoint: list[str],
                   evicted: _Evicted | None = None) -> None:
        """Resolve one layer (or rebuild an ``evicted`` one) into ``fut``, then keep it."""
        t0 = time.monotonic()
        try:
            layer = self._resolve_layer(ref, desc, evicted)
        except Exception as e:
            log.warning("image %s layer %s: declined: %s", ref, desc.digest, e)
            metrics.layer_declined()
            fut.set_exception(LayerUnavailable(errno.EIO, f"image {ref} layer {desc.digest}: {e}",
                                               transient=_transient(e)))
            return
        if evicted is not None:
            # Its prefetch, prediction and background fetch ran when it was first resolved.
            log.info("image %s layer %s: rebuilt from saved metadata: %d files, in %.2fs",
                     ref, desc.digest, layer.view.file_count, time.monotonic() - t0)
        else:
            log.info("image %s layer %s: ready: %d files, %d bytes compressed, %d uncompressed, in %.2fs",
                     ref, desc.digest, layer.view.file_count, desc.size, layer.diff_size, time.monotonic() - t0)
            metrics.layer_resolved()
            if self.predictor is not None and not layer.prefetch:  # an optimized layer prefetches its own
                self.predictor.start(layer, entrypoint)
            if layer.prefetch or self.config.fetch.background:
                self._warmers.submit(self._warm, layer)
        self._keep(layer)  # first: what it evicts is gone, hooks called, before a lookup gets it
        fut.set_result(layer)

    def _find_elsewhere(self, ref: str, digest: str, res: _Resolution,
                        cancel: threading.Event | None = None) -> tuple[LayerDescriptor, _Resolution]:
        """Find a layer the current resolution lacks: the tag may have moved, or we restarted."""
        if time.monotonic() - res.started > 1.0:
            res = self._resolution(ref, fresh=True)
            try:
                image = self._wait(res.image, time.monotonic() + self.config.resolve.timeout, f"image {ref}",
                                   cancel)
                desc = image.find(digest)
                if desc is not None:
                    return desc, res
            except LayerUnavailable:
                pass
        found = self._from_saved(ref, digest)
        if found is None:
            raise LayerUnavailable(errno.ENOENT, f"image {ref} has no layer {digest}")
        return found

    def _from_saved(self, ref: str, digest: str) -> tuple[LayerDescriptor, _Resolution] | None:
        """The layer from a manifest ``ref`` resolved to before (kept in the state dir), if any."""
        for mdigest in self.state.manifests(ref):
            try:
                image = self._image_from(ref, mdigest, self._saved(mdigest), lambda _r, d: self._saved(d))
            except ALSError:
                continue
            desc = image.find(digest)
            if desc is not None:
                log.info("image %s layer %s: found in earlier manifest %s", ref, digest, mdigest)
                old = _Resolution(started=time.monotonic())
                old.image.set_result(image)
                self._start_layers(image, old)
                return desc, old
        return None

    def _saved(self, digest: str) -> bytes:
        data = self.state.get_blob(digest)
        if data is None:
            raise NotFoundError(f"{digest} is not saved")
        return data

    def _fetch_image(self, ref: str) -> Image:
        r = parse_reference(ref)
        m = self.client.get_manifest(r)
        data, media_type, digest = m.data, m.media_type, m.digest
        for _ in range(2):  # an index, then the platform's manifest
            doc = json_object(data, f"manifest of {ref}")
            if media_type not in INDEX_TYPES and "manifests" not in doc:
                break
            chosen = self._pick_platform(doc, ref)
            m = self.client.get_manifest(r, chosen)
            data, media_type, digest = m.data, m.media_type, m.digest
        self.state.put_blob(digest, data)

        def config(_ref, cdigest):
            blob = self.client.get_blob(r, cdigest, MAX_METADATA)
            self.state.put_blob(cdigest, blob)
            return blob

        image = self._image_from(ref, digest, data, config)
        self.state.add_manifest(ref, digest)
        return image

    def _image_from(self, ref: str, mdigest: str, data: bytes, get_config) -> Image:
        doc = json_object(data, f"manifest {mdigest} of {ref}")
        try:
            cdigest = doc["config"]["digest"]
            layers = doc["layers"]
        except (KeyError, TypeError):
            raise FormatError(f"manifest {mdigest} of {ref} has no config or layers") from None
        config = json_object(get_config(ref, cdigest), f"config {cdigest} of {ref}")
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        if len(diff_ids) != len(layers):
            raise FormatError(f"image {ref}: {len(layers)} layers but {len(diff_ids)} diff_ids in its config")
        descs = []
        for i, (l, diff_id) in enumerate(zip(layers, diff_ids)):
            try:
                descs.append(LayerDescriptor(index=i, digest=l["digest"], size=int(l["size"]),
                                             media_type=l.get("mediaType", ""),
                                             annotations=dict(l.get("annotations") or {}), diff_id=diff_id))
            except (KeyError, TypeError, ValueError):
                raise FormatError(f"image {ref}: layer {i} descriptor is malformed") from None
        return Image(ref=ref, manifest_digest=mdigest, layers=descs, entrypoint=startup.entrypoint(config))

    def _pick_platform(self, index: dict, ref: str) -> str:
        want_os, want_arch, want_variant = self._platform
        candidates = []
        for m in index.get("manifests") or []:
            p = m.get("platform") or {}
            if p.get("os") == want_os and p.get("architecture") == want_arch:
                exact = not want_variant or p.get("variant", want_variant) == want_variant
                candidates.append((not exact, m["digest"]))
        if not candidates:
            raise NotFoundError(f"image {ref} has no manifest for {'/'.join(filter(None, self._platform))}")
        return sorted(candidates)[0][1]

    def _resolve_layer(self, ref: str, desc: LayerDescriptor, evicted: _Evicted | None = None) -> Layer:
        r = parse_reference(ref)
        label = f"image {ref} layer {desc.digest}"
        read_range = partial(self.client.read_range, r, desc.digest)
        opened = self._open_toc(label, desc, read_range, evicted.diff_size if evicted is not None else None)
        toc, diff_size = opened.toc, opened.diff_size
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
        if opened.tail:
            self.fetcher.absorb(source, opened.tail[:max(toc.data_end - opened.tail_start, 0)], opened.tail_start)
        return Layer(ref=ref, desc=desc, toc_digest=toc.digest, diff_size=diff_size, view=view, source=source,
                     prefetch=self._prefetch_chunks(toc, source), layer_id=layer_id)

    def _prefetch_chunks(self, toc: T.TOC, source: BlobSource) -> list[T.Chunk]:
        """What to fetch as soon as the layer resolves: landmarks first, else the configured size."""
        names = {e.name: e for e in toc.entries if e.name in (estargz.PREFETCH_LANDMARK,
                                                               estargz.NO_PREFETCH_LANDMARK)}
        if estargz.NO_PREFETCH_LANDMARK in names:
            return []
        landmark = names.get(estargz.PREFETCH_LANDMARK)
        if landmark is not None and landmark.chunks:
            end = landmark.chunks[0].blob_start
        else:
            end = self.config.fetch.prefetch_size
        return [c for c in source.chunks if c.blob_end <= end]

    def _warm(self, layer: Layer) -> None:
        """Prefetch the layer's prioritised front, then stream the rest of it in the background."""
        label = layer.source.label
        try:
            if layer.prefetch:
                t0 = time.monotonic()
                n = self.fetcher.prefetch(layer.source, layer.prefetch, self.config.fetch.prefetch_request)
                log.info("%s: prefetched %d chunks (%d bytes) in %.2fs", label, len(layer.prefetch), n,
                         time.monotonic() - t0)
            if self.config.fetch.background and not self._stop.is_set():
                t0 = time.monotonic()
                left = sum(c.blob_end - c.blob_start for c in layer.source.chunks
                           if not self.fetcher.cache.contains(c.digest))
                with metrics.background_fetch(label, left) as progress:
                    n = self.fetcher.background(layer.source, self._stop, self.config.fetch.background_step,
                                                progress=progress.advance)
                if not self._stop.is_set():
                    log.info("%s: background fetch done: %d bytes in %.2fs", label, n, time.monotonic() - t0)
        except Exception as e:  # warming is an optimisation: reads fetch what it missed
            log.warning("%s: prefetch or background fetch failed: %s", label, e)

    def _open_toc(self, label: str, desc: LayerDescriptor, read_range,
                  known_diff_size: int | None = None) -> lazy.OpenedTOC:
        """The layer's verified TOC and exact diff size, through its format; declined if it has none.

        ``known_diff_size`` is one computed before (the layer is rebuilt after eviction).
        """
        fmt = lazy.format_for(desc.media_type, desc.annotations)
        if fmt is None:
            raise FormatError(lazy.unserved_reason(desc.media_type))
        resolve = self.config.resolve
        ctx = lazy.TOCContext(saved=self.state, log=log, max_toc_size=resolve.max_toc_size,
                              max_entries=resolve.max_toc_entries, tail_size=resolve.tail_size,
                              allow_unverified=resolve.allow_unverified, parse_slot=_PARSE_SLOTS)
        return fmt.open_toc(label, desc.size, desc.annotations, read_range, ctx, known_diff_size)

    def _wait(self, fut: Future, deadline: float, what: str, cancel: threading.Event | None = None):
        try:
            return wait_for(fut, deadline, cancel)
        except FutureTimeout:
            raise LayerUnavailable(errno.EIO, f"{what}: not resolved within "
                                              f"{self.config.resolve.timeout:g}s") from None
        except Interrupted:
            raise Interrupted(f"{what}: the caller went away while it resolved") from None


def _transient(e: Exception) -> bool:
    """Registry trouble that may pass (unreachable, timeouts, 5xx, refused credentials), unlike
    a bad layer, a missing image or a blocked registry: worth trying again before the TTL ends."""
    return isinstance(e, RegistryError) and not isinstance(e, (NotFoundError, BlockedError))


def _as_unavailable(e: Exception, what: str) -> LayerUnavailable:
    if isinstance(e, LayerUnavailable):
        return e
    if isinstance(e, NotFoundError):
        return LayerUnavailable(errno.ENOENT, f"{what}: {e}")
    return LayerUnavailable(errno.EIO, f"{what}: {e}", transient=_transient(e))

