"""Image references resolved to images, and their layers to futures: index, platform, manifest, config, saved state.

The first lookup under an image reference resolves the image once (the
index, the host's platform in it, the manifest, the config) and starts
resolving all of its layers in parallel, because containers/image looks
layers up one at a time under a lock: by the time it asks for the second
layer, it is ready. A resolution lives ``resolve.ttl`` seconds (a tag may
move); one that failed for a reason that may pass lives ``resolve.failure_ttl``.

What an image resolved to is saved in the state directory: when the registry
is away, or the tag moved while Podman's graph root still names a layer of
the old image, the layer is found in a manifest saved before and served from
there. Every wait is bounded; a layer that cannot be served lazily is
*declined* (LayerUnavailable, EIO), and Podman pulls it normally.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable

from als.config import Config
from als.errors import ALSError, BlockedError, FormatError, Interrupted, NotFoundError, RegistryError
from als.fetch.fetcher import ChunkFetcher
from als.layer import startup
from als.layer.resolved import Layer, LayerDescriptor
from als.oci import GZIP_INDEX_ANNOTATION, INDEX_TYPES, json_object
from als import metrics
from als.reference import parse_reference
from als.registry.client import RegistryClient
from als.store.build import Evicted, LayerBuilder, Referred
from als.store.referred import ReferrerListings
from als.store.platforms import host_platform, parse_platform, pick_platform
from als.store.state import StateDir
from als.store.warm import Warmer
from als.wait import wait_for

log = logging.getLogger("als.store")

MAX_METADATA = 8 << 20  # largest manifest or config accepted
MAX_READ_AHEAD = 64  # layers of one image whose first read starts before the config is in
SAVED_GRACE = 5.0  # seconds a layer rebuilt from saved metadata may take, past a failed resolution


class LayerUnavailable(ALSError):
    """A lookup the store answers with an errno: ENOENT (no such layer) or EIO (declined)."""

    def __init__(self, err: int, message: str, transient: bool = False):
        super().__init__(message)
        self.errno = err
        self.transient = transient  # the cause may pass (registry trouble): retried after failure_ttl


@dataclass
class Image:
    """What a lookup needs of an image: its layers' descriptors (and its program, for prediction)."""

    ref: str
    manifest_digest: str
    layers: list[LayerDescriptor]
    entrypoint: list[str] = field(default_factory=list)  # where its default program may be (startup.py)
    config_digest: str = ""  # its config blob, kept in the state directory

    def find(self, digest: str) -> LayerDescriptor | None:
        """The layer named by a compressed digest (Podman < 5.1) or a TOC digest (Podman >= 5.1)."""
        for d in self.layers:
            if digest in (d.digest, d.toc_digest):
                return d
        return None


@dataclass
class Resolution:
    """One resolution of an image reference; replaced when its TTL runs out."""

    started: float
    image: Future = field(default_factory=Future)  # -> Image
    layers: dict[str, Future] = field(default_factory=dict)  # blob digest -> Future[Layer]
    # blob digest -> an evicted layer of this image: it has no future until it is looked up again
    evicted: dict[str, Evicted] = field(default_factory=dict)
    # -> the gzip indexes its image's referrers name (store/referred.py): listed once, by the first
    # plain gzip layer that asks, and kept for the others and any rebuild
    referred: Future | None = None

    def has_layer(self, digest: str) -> bool:
        """Whether the image resolved to a manifest naming this blob."""
        image = self.image
        return (image.done() and image.exception() is None
                and any(d.digest == digest for d in image.result().layers))

    def failed_transiently(self) -> bool:
        """Whether the image or one of its layers failed for a reason that may pass by now."""
        return any(f.done() and getattr(f.exception(), "transient", False)
                   for f in (self.image, *self.layers.values()))


class Resolver:
    """The resolutions of image references, and the futures of their layers.

    It shares the store's lock (``lock``): a layer kept in or evicted from
    memory and its resolution's record of that change together. ``held``
    (called with the lock held) is the store's layer kept in memory under a
    (reference, blob digest), if any, so that a resolution reuses it rather
    than building a second tree; ``keep`` hands the store each layer resolved,
    before any lookup sees it.
    """

    def __init__(self, config: Config, client: RegistryClient, fetcher: ChunkFetcher, state: StateDir,
                 warmer: Warmer, lock: threading.Lock, held: Callable[[str, str], Layer | None],
                 keep: Callable[[Layer], None]):
        self.config = config
        self.client = client
        self.state = state
        self.builder = LayerBuilder(config, client, fetcher, state)
        self._warmer = warmer
        self._lock = lock
        self._held = held
        self._keep = keep
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="als-resolve")
        self.referrers = ReferrerListings(client, state, config.resolve.timeout) \
            if config.resolve.gzip_index_referrers else None
        self._resolutions: dict[str, Resolution] = {}
        self._fallbacks: dict[str, Resolution] = {}  # ref -> image rebuilt from saved metadata
        self._adopting = threading.Lock()  # one rebuild from saved metadata per image at a time
        self._platform = parse_platform(config.resolve.platform) if config.resolve.platform else host_platform()

    def close(self) -> None:
        """Start no more resolutions; those running finish (a lookup's wait is bounded anyway)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.builder.close()
        if self.referrers is not None:
            self.referrers.close()

    def prepare(self, ref: str) -> None:
        """Start resolving ``ref`` in the background, unless its resolution is still current."""
        self._resolution(ref)

    def resolutions(self) -> dict[str, Resolution]:
        """The current resolution of each image reference looked up."""
        with self._lock:
            return dict(self._resolutions)

    def image(self, ref: str, cancel: threading.Event | None = None) -> Image:
        """The image ``ref`` resolves to (as for a lookup), waiting at most the resolve timeout."""
        return self._wait(self._resolution(ref).image, time.monotonic() + self.config.resolve.timeout,
                          f"image {ref}", cancel)

    def pinned(self, ref: str, platform: str) -> str:
        """``ref`` pinned to the manifest of ``platform`` (os/arch[/variant]) in its index, if it has one."""
        wanted = parse_platform(platform)  # a malformed one is refused even for an image with no index
        r = parse_reference(ref)
        m = self.client.get_manifest(r)
        doc = json_object(m.data, f"manifest of {ref}")
        if m.media_type not in INDEX_TYPES and "manifests" not in doc:
            return ref
        return str(dataclasses.replace(r, digest=pick_platform(doc, ref, wanted)))

    def layer(self, ref: str, digest: str, cancel: threading.Event | None = None) -> Layer:
        """Layer ``digest`` of image ``ref`` once resolved, waiting at most the resolve timeout.

        ``cancel``: the caller went away (a FUSE interrupt): stop waiting, raise Interrupted.
        """
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
        return self._wait(self._layer_future(res, desc), deadline, f"image {ref} layer {digest}", cancel)

    def known_layer(self, ref: str, digest: str, cancel: threading.Event | None = None) -> Layer:
        """Layer ``digest`` of image ``ref`` for a node the kernel kept across a restart of the store.

        The kernel asks by node id, with no lookup first, while the image may be
        resolving anew: a resolution that has the layer already answers, else the
        layer is rebuilt from the manifest and TOC saved in the state directory,
        without waiting for the registry; only a layer never saved waits for it.
        """
        deadline = time.monotonic() + self.config.resolve.timeout
        with self._adopting:
            found = None
            with self._lock:
                candidates = [r for r in (self._resolutions.get(ref), self._fallbacks.get(ref)) if r is not None]
            for res in candidates:
                image = res.image
                if image.done() and image.exception() is None and image.result().find(digest) is not None:
                    found = image.result().find(digest), res
                    break
            if found is None:
                found = self._from_saved(ref, digest)
                if found is not None:
                    with self._lock:
                        self._fallbacks.setdefault(ref, found[1])
        if found is None:
            return self.layer(ref, digest, cancel)
        return self._wait(self._layer_future(found[1], found[0]), deadline, f"image {ref} layer {digest}", cancel)

    # ---- the store's keeping and evicting (its lock held) -----------------------------
    def kept(self, ref: str, digest: str) -> None:
        """The store holds this layer in memory again: it is no longer recorded as evicted."""
        for res in self._held_by(ref):
            res.evicted.pop(digest, None)

    def evicted(self, layer: Layer) -> None:
        """The store dropped ``layer``: a later lookup rebuilds it with its diff size and layer id."""
        ref, digest = layer.ref, layer.desc.digest
        for res in self._held_by(ref):
            fut = res.layers.get(digest)
            if fut is None or (fut.done() and fut.exception() is None and fut.result() is layer):
                res.layers.pop(digest, None)  # None: a lookup kept it after an earlier eviction
                if res.has_layer(digest):
                    res.evicted[digest] = Evicted(layer.diff_size, layer.layer_id)

    def _held_by(self, ref: str) -> list[Resolution]:
        """The resolutions whose futures hold ``ref``'s layers for later lookups (lock held)."""
        return [r for r in (self._resolutions.get(ref), self._fallbacks.get(ref)) if r is not None]

    # ---- layers -----------------------------------------------------------------------
    def _layer_future(self, res: Resolution, desc: LayerDescriptor) -> Future:
        """The resolution's future of layer ``desc``; an evicted layer's rebuild starts here."""
        with self._lock:
            fut = res.layers.get(desc.digest)
            if fut is not None:
                return fut
            fut = res.layers[desc.digest] = Future()
            evicted = res.evicted.pop(desc.digest, None)
        image = res.image.result()  # done: desc was found in it
        self._pool.submit(self._run_layer, image.ref, desc, fut, image.entrypoint, evicted,
                          self._referred_for(res, image.ref, image.manifest_digest))
        return fut

    def _from_registry(self, ref: str, digest: str, deadline: float,
                       cancel: threading.Event | None) -> tuple[LayerDescriptor, Resolution, float]:
        """The layer's descriptor from the image's current resolution, or from saved metadata."""
        res = self._resolution(ref)
        if not res.image.done():
            with self._lock:
                held = self._held(ref, digest) is not None
            if not held:
                # Podman waits on this layer: its tail is read while the manifest is fetched.
                self.builder.guess_tail(ref, digest, res.image)
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

    def _start_layers(self, image: Image, res: Resolution, previous: Resolution | None = None) -> None:
        """Resolve every layer of ``image`` in parallel, but for those ``res`` need not build again.

        A layer held in memory is reused as it is (a tag resolved again after
        its TTL does not build a second tree of it), and one evicted since the
        ``previous`` resolution stays evicted until it is looked up.
        """
        start = []
        with self._lock:
            for desc in image.layers:
                kept = self._held(image.ref, desc.digest)
                evicted = previous.evicted.get(desc.digest) if previous is not None else None
                if kept is not None and kept.desc == desc:
                    res.layers[desc.digest] = fut = Future()
                    fut.set_result(kept)
                elif evicted is not None:
                    res.evicted[desc.digest] = evicted
                else:
                    res.layers[desc.digest] = fut = Future()
                    start.append((desc, fut))
        # Reads and builds ahead of layers not built now, or of blobs the image lacks, are not wanted.
        wanted = {d.digest for d, _ in start} | {d.annotations.get(GZIP_INDEX_ANNOTATION, "") for d, _ in start}
        self.builder.early.discard_image(image.ref, wanted)
        self.builder.forget_prebuilt(image.ref, {d.digest for d, _ in start})
        referred = self._referred_for(res, image.ref, image.manifest_digest)
        for desc, fut in start:
            self._pool.submit(self._run_layer, image.ref, desc, fut, image.entrypoint, None, referred)

    def _referred_for(self, res: Resolution, ref: str, manifest_digest: str) -> Referred | None:
        return self.referrers.for_layers(res, ref, manifest_digest) if self.referrers is not None else None

    def _run_layer(self, ref: str, desc: LayerDescriptor, fut: Future, entrypoint: list[str],
                   evicted: Evicted | None = None, referred: Referred | None = None) -> None:
        """Resolve one layer (or rebuild an ``evicted`` one) into ``fut``, then keep it."""
        t0 = time.monotonic()
        try:
            layer = self.builder.build(ref, desc, evicted, referred)
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
        self._keep(layer)  # first: what it evicts is gone, hooks called, before a lookup gets it
        fut.set_result(layer)
        if evicted is None:  # once the lookup has its answer: Podman's pull waits for none of this
            self._warmer.start(layer, entrypoint)

    # ---- images -----------------------------------------------------------------------
    def _resolution(self, ref: str, *, fresh: bool = False) -> Resolution:
        now = time.monotonic()
        with self._lock:
            res = self._resolutions.get(ref)
            age = now - res.started if res is not None else 0.0
            # A registry that was down must not pin a decline for the whole TTL.
            if res is not None and not fresh and age < self.config.resolve.ttl and not (
                    age >= self.config.resolve.failure_ttl and res.failed_transiently()):
                return res
            previous, res = res, Resolution(started=now)
            self._resolutions[ref] = res
        self._pool.submit(self._run_resolution, ref, res, previous)
        return res

    def _run_resolution(self, ref: str, res: Resolution, previous: Resolution | None = None) -> None:
        t0 = time.monotonic()
        try:
            image = self._fetch_image(ref, res, previous)
        except Exception as e:
            log.warning("image %s: cannot resolve: %s", ref, e)
            res.image.set_exception(_as_unavailable(e, f"image {ref}"))
            return
        self._start_layers(image, res, previous)
        res.image.set_result(image)
        log.info("image %s: resolved manifest %s (%d layers) in %.2fs", ref, image.manifest_digest,
                 len(image.layers), time.monotonic() - t0)

    def _find_elsewhere(self, ref: str, digest: str, res: Resolution,
                        cancel: threading.Event | None = None) -> tuple[LayerDescriptor, Resolution]:
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

    def _from_saved(self, ref: str, digest: str) -> tuple[LayerDescriptor, Resolution] | None:
        """The layer from a manifest ``ref`` resolved to before (kept in the state dir), if any."""
        for mdigest in self.state.manifests(ref):
            try:
                image = self._image_from(ref, mdigest, self._saved(mdigest), lambda _r, d: self._saved(d))
            except ALSError:
                continue
            desc = image.find(digest)
            if desc is not None:
                log.info("image %s layer %s: found in earlier manifest %s", ref, digest, mdigest)
                old = Resolution(started=time.monotonic())
                old.image.set_result(image)
                self._start_layers(image, old)
                return desc, old
        return None

    def _saved(self, digest: str) -> bytes:
        data = self.state.get_blob(digest)
        if data is None:
            raise NotFoundError(f"{digest} is not saved")
        return data

    def _fetch_image(self, ref: str, res: Resolution | None = None, previous: Resolution | None = None) -> Image:
        r = parse_reference(ref)
        m = self.client.get_manifest(r)
        data, media_type, digest = m.data, m.media_type, m.digest
        for _ in range(2):  # an index, then the platform's manifest
            doc = json_object(data, f"manifest of {ref}")
            if media_type not in INDEX_TYPES and "manifests" not in doc:
                break
            chosen = pick_platform(doc, ref, self._platform)
            m = self.client.get_manifest(r, chosen)
            data, media_type, digest = m.data, m.media_type, m.digest
        self.state.put_blob(digest, data)
        self.builder.fetch_indexes_early(ref, doc)
        if res is not None and self.referrers is not None:
            self.referrers.start(res, ref, digest, doc)
        ahead = self._read_ahead(ref, data, previous)

        def config(_ref, cdigest):
            blob = self.client.get_blob(r, cdigest, MAX_METADATA)
            self.state.put_blob(cdigest, blob)
            return blob

        try:
            image = self._image_from(ref, digest, data, config)
        except BaseException:
            for layer_digest in ahead:
                self.builder.early.discard((ref, layer_digest))
            self.builder.forget_prebuilt(ref, set())
            raise
        self.state.add_manifest(ref, digest)
        return image

    def _read_ahead(self, ref: str, manifest: bytes, previous: Resolution | None = None) -> list[str]:
        """Start each layer's first read (its TOC's bytes), and its build, before the config is in;
        the layers it started for. Layers held in memory, or evicted since ``previous``, are left
        alone. What the manifest gets wrong is left for ``_image_from`` to report."""
        try:
            layers = json_object(manifest, "manifest")["layers"]
            started = []
            for i, l in enumerate(layers[:MAX_READ_AHEAD]):
                desc = LayerDescriptor(index=i, digest=l["digest"], size=int(l["size"]),
                                       media_type=l.get("mediaType", ""),
                                       annotations=dict(l.get("annotations") or {}), diff_id="")
                with self._lock:
                    skip = (self._held(ref, desc.digest) is not None
                            or (previous is not None and desc.digest in previous.evicted))
                if not skip and self.builder.read_ahead(ref, desc.digest, desc.size, desc.media_type,
                                                        desc.annotations):
                    started.append(desc.digest)
                    self.builder.prebuild(ref, desc)
            return started
        except (ALSError, KeyError, TypeError, ValueError, AttributeError):
            return []

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
        return Image(ref=ref, manifest_digest=mdigest, layers=descs, entrypoint=startup.entrypoint(config),
                     config_digest=cdigest)

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
