"""The additional layer store: images, their layers, `info`, `blob` and use counts.

This is the ALS protocol with no FUSE in it. The first lookup under an image
reference resolves the image once (manifest, config) and starts resolving all
of its layers in parallel, because containers/image looks layers up one at a
time under a lock: by the time it asks for the second layer, it is ready.
Every wait is bounded; a layer that cannot be served lazily is *declined*
(the FUSE adapter answers EIO), and Podman pulls it normally.
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import hashlib
import json
import logging
import platform
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from functools import partial

from als import metrics, startup
from als.access import AccessRecorder
from als.config import Config
from als.consumer import Consumers
from als.errors import ALSError, BlockedError, FormatError, NotFoundError, RegistryError, VerificationError
from als.fetch import BlobSource, ChunkFetcher
from als.image import json_object
from als.formats import estargz, zstdchunked
from als.formats import toc as T
from als.layer import LayerView
from als.reference import parse_reference
from als.registry.client import RegistryClient
from als.state import StateDir

log = logging.getLogger("als.store")

INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json"}
GZIP_LAYER_TYPES = {"application/vnd.oci.image.layer.v1.tar+gzip",
                    "application/vnd.docker.image.rootfs.diff.tar.gzip"}
COMPRESSION_GZIP = 2  # containers/storage archive.Gzip
COMPRESSION_ZSTD = 4  # containers/storage archive.Zstd
ZSTD_LAYER_TYPES = {zstdchunked.MEDIA_TYPE}
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


@dataclass(frozen=True)
class LayerDescriptor:
    index: int
    digest: str
    size: int
    media_type: str
    annotations: dict
    diff_id: str

    @property
    def toc_digest(self) -> str:
        """The eStargz TOC digest, or the zstd:chunked manifest checksum (either annotation spelling)."""
        for key in (estargz.TOC_DIGEST_ANNOTATION, *zstdchunked.CHECKSUM_ANNOTATIONS):
            if key in self.annotations:
                return self.annotations[key]
        return ""


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


@dataclass
class Layer:
    """A resolved layer that the store serves lazily."""

    ref: str
    desc: LayerDescriptor
    toc_digest: str
    diff_size: int
    view: LayerView
    source: BlobSource
    prefetch: list[T.Chunk] = field(default_factory=list)  # fetched as soon as the layer resolves

    def info(self, key: str) -> bytes:
        """The `info` JSON for the digest Podman used to name the layer."""
        compression = COMPRESSION_ZSTD if self.source.compression == T.ZSTD else COMPRESSION_GZIP
        if key == self.desc.digest:
            body = {"compressed-diff-digest": self.desc.digest, "compressed-size": self.desc.size,
                    "diff-digest": self.desc.diff_id, "diff-size": self.diff_size,
                    "compression": compression}
        else:  # named by TOC digest: Podman >= 5.1 keeps TOC-trusted layers apart from DiffID ones
            body = {"toc-digest": self.toc_digest, "compressed-size": self.desc.size,
                    "diff-size": self.diff_size, "compression": compression,
                    "flags": {"expected-layer-diffid": self.desc.diff_id}}
        return (json.dumps(body) + "\n").encode()


@dataclass
class _Resolution:
    """One resolution of an image reference; replaced when its TTL runs out."""

    started: float
    image: Future = field(default_factory=Future)  # -> Image
    layers: dict[str, Future] = field(default_factory=dict)  # blob digest -> Future[Layer]

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

    def layer(self, ref: str, digest: str) -> Layer:
        """The servable layer ``digest`` of image ``ref``, waiting at most the resolve timeout."""
        layer = self._layers.get((ref, digest))
        if layer is not None:
            return layer
        deadline = time.monotonic() + self.config.resolve.timeout
        with self._lock:
            fallback = self._fallbacks.get(ref)
        desc = fallback.image.result().find(digest) if fallback is not None else None
        if desc is not None:
            # An earlier lookup found the registry away and served this image from saved
            # metadata: its other layers come from there too, without waiting for it again.
            res = fallback
        else:
            desc, res, deadline = self._from_registry(ref, digest, deadline)
        layer = self._wait(res.layers[desc.digest], deadline, f"image {ref} layer {digest}")
        with self._lock:
            self._layers[(ref, desc.digest)] = layer
            if layer.toc_digest:
                self._layers[(ref, layer.toc_digest)] = layer
        return layer

    def _from_registry(self, ref: str, digest: str, deadline: float) -> tuple[LayerDescriptor, _Resolution, float]:
        """The layer's descriptor from the image's current resolution, or from saved metadata."""
        res = self._resolution(ref)
        try:
            image = self._wait(res.image, deadline, f"image {ref}")
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
            desc, res = self._find_elsewhere(ref, digest, res)
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
            else:
                self._uses[(ref, digest)] = n - 1
        log.info("image %s layer %s: released (%d)", ref, digest, max(n - 1, 0))

    def uses(self, ref: str, digest: str) -> int:
        return self._uses.get((ref, digest), 0)

    def refs(self) -> list[str]:
        """Image references looked up so far."""
        with self._lock:
            return list(self._resolutions)

    def layers(self) -> list[Layer]:
        with self._lock:
            return list({id(l): l for l in self._layers.values()}.values())

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
            res = _Resolution(started=now)
            self._resolutions[ref] = res
        self._pool.submit(self._run_resolution, ref, res)
        return res

    def _run_resolution(self, ref: str, res: _Resolution) -> None:
        t0 = time.monotonic()
        try:
            image = self._fetch_image(ref)
        except Exception as e:
            log.warning("image %s: cannot resolve: %s", ref, e)
            res.image.set_exception(_as_unavailable(e, f"image {ref}"))
            return
        self._start_layers(image, res)
        res.image.set_result(image)
        log.info("image %s: resolved manifest %s (%d layers) in %.2fs", ref, image.manifest_digest,
                 len(image.layers), time.monotonic() - t0)

    def _start_layers(self, image: Image, res: _Resolution) -> None:
        for desc in image.layers:
            fut: Future = Future()
            res.layers[desc.digest] = fut
            self._pool.submit(self._run_layer, image.ref, desc, fut, image.entrypoint)

    def _run_layer(self, ref: str, desc: LayerDescriptor, fut: Future, entrypoint: list[str]) -> None:
        t0 = time.monotonic()
        try:
            layer = self._resolve_layer(ref, desc)
        except Exception as e:
            log.warning("image %s layer %s: declined: %s", ref, desc.digest, e)
            metrics.layer_declined()
            fut.set_exception(LayerUnavailable(errno.EIO, f"image {ref} layer {desc.digest}: {e}",
                                               transient=_transient(e)))
            return
        log.info("image %s layer %s: ready: %d files, %d bytes compressed, %d uncompressed, in %.2fs",
                 ref, desc.digest, layer.view.file_count, desc.size, layer.diff_size, time.monotonic() - t0)
        metrics.layer_resolved()
        if self.predictor is not None and not layer.prefetch:  # an optimized layer prefetches its own
            self.predictor.start(layer, entrypoint)
        if layer.prefetch or self.config.fetch.background:
            self._warmers.submit(self._warm, layer)
        fut.set_result(layer)

    def _find_elsewhere(self, ref: str, digest: str, res: _Resolution) -> tuple[LayerDescriptor, _Resolution]:
        """Find a layer the current resolution lacks: the tag may have moved, or we restarted."""
        if time.monotonic() - res.started > 1.0:
            res = self._resolution(ref, fresh=True)
            try:
                image = self._wait(res.image, time.monotonic() + self.config.resolve.timeout, f"image {ref}")
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

    def _resolve_layer(self, ref: str, desc: LayerDescriptor) -> Layer:
        r = parse_reference(ref)
        label = f"image {ref} layer {desc.digest}"
        read_range = partial(self.client.read_range, r, desc.digest)
        if desc.media_type in ZSTD_LAYER_TYPES:
            toc, diff_size = self._load_zstd_toc(label, desc, read_range)
            tail, tail_start = b"", 0
        else:
            toc, diff_size, tail, tail_start = self._load_estargz_toc(label, desc, read_range)
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
                     prefetch=self._prefetch_chunks(toc, source))

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

    def _load_zstd_toc(self, label: str, desc: LayerDescriptor, read_range) -> tuple[T.TOC, int]:
        """A zstd:chunked layer's verified TOC (located by its annotations) and its exact diff size.

        containers/storage needs the size exact, and Podman writes no
        annotation for it (see ``_zstd_diff_size``).
        """
        if not zstdchunked.is_zstd_chunked(desc.annotations):
            raise FormatError("a zstd layer without zstd:chunked annotations is not served lazily")
        max_toc = self.config.resolve.max_toc_size
        loc = zstdchunked.locate(desc.annotations, desc.size, max_toc_size=max_toc)
        saved = self.state.get_toc(loc.checksum)
        toc = None
        if saved is not None:
            try:
                with _PARSE_SLOTS:
                    toc = zstdchunked.parse_manifest(saved[1], loc)
            except FormatError:
                log.warning("%s: saved TOC is unusable; reading it from the registry again", label)
        if toc is None:
            data = read_range(loc.offset, loc.offset + loc.length)
            with _PARSE_SLOTS:
                toc = zstdchunked.parse_manifest(data, loc)
            self.state.put_toc(loc.checksum, loc.offset, data)
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

    def _wait(self, fut: Future, deadline: float, what: str):
        try:
            return fut.result(timeout=max(deadline - time.monotonic(), 0.0))
        except FutureTimeout:
            raise LayerUnavailable(errno.EIO, f"{what}: not resolved within "
                                              f"{self.config.resolve.timeout:g}s") from None


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


class BlobReader:
    """Sequential reads of a layer's compressed blob, for `podman push` and `podman save`.

    Podman streams `blob` from byte 0 to the end, so this reads ahead in large
    ranges and hashes as it goes: a blob that does not match its digest fails
    the last read with EIO rather than completing an export of wrong bytes.
    """

    WINDOW = 8 << 20

    def __init__(self, layer: Layer):
        self.layer = layer
        self._lock = threading.Lock()
        self._buf = b""
        self._buf_start = 0
        self._hash = hashlib.sha256()
        self._hashed_to = 0

    def read(self, offset: int, size: int) -> bytes:
        total = self.layer.desc.size
        end = min(offset + size, total)
        if offset >= end:
            return b""
        with self._lock:
            if not (self._buf_start <= offset and end <= self._buf_start + len(self._buf)):
                self._buf_start = offset
                self._buf = self.layer.source.read_range(offset, min(offset + max(self.WINDOW, size), total))
            data = self._buf[offset - self._buf_start:end - self._buf_start]
            if offset == self._hashed_to:
                self._hash.update(data)
                self._hashed_to = end
                if end == total and "sha256:" + self._hash.hexdigest() != self.layer.desc.digest:
                    raise VerificationError(f"{self.layer.source.label}: blob does not match its digest")
        return data
