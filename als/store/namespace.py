"""The additional layer store's namespace: images and their layers by name, `use` counts, eviction, close.

This is the ALS protocol with no FUSE in it (als/fuse/filesystem.py presents
it). A lookup of ``<image>/<digest>`` answers from the layers held in
memory, else waits (bounded) for the image's resolution (als/store/resolve.py);
warming is als/store/warm.py, `blob` is als/store/blob.py.

A resolved layer's tree costs about 1.2 KiB of memory per TOC entry, so the
store keeps at most ``resolve.max_idle_layers`` layers that no container uses
(containers/storage's `use` count), dropping the least recently looked up
first. Their TOCs stay in the state directory: a later lookup rebuilds the
layer from there, with the same inode numbers, without asking the registry.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import threading
from collections import OrderedDict
from typing import Callable

from als.config import Config
from als.fetch.fetcher import ChunkFetcher
from als.layer.access import AccessRecorder
from als.layer.resolved import Layer
from als import metrics
from als.reference import parse_reference
from als.registry.client import RegistryClient
from als.store.consumer import Consumers
from als.store.resolve import LayerUnavailable, Resolution, Resolver
from als.store.state import StateDir
from als.store.warm import Warmer

__all__ = ["LayerUnavailable", "Store", "decode_ref"]  # what the FUSE layer asks for

log = logging.getLogger("als.store")


@functools.lru_cache(maxsize=1024)
def decode_ref(name: str) -> str | None:
    """The image reference a top-level directory name encodes (std base64), or None."""
    try:
        ref = base64.b64decode(name.encode("ascii"), validate=True).decode("utf-8")
        parse_reference(ref)
    except (ValueError, binascii.Error, UnicodeError):
        return None
    return ref


class Store:
    """The namespace and its lifecycle; resolution is its ``resolver``'s, warming its ``warmer``'s."""

    def __init__(self, config: Config, client: RegistryClient, fetcher: ChunkFetcher, state: StateDir):
        self.config = config
        self.client = client
        self.fetcher = fetcher
        self.state = state
        self._lock = threading.Lock()
        self._layers: dict[tuple[str, str], Layer] = {}  # (ref, digest or TOC digest) -> Layer
        self._recent: OrderedDict[tuple[str, str], Layer] = OrderedDict()  # (ref, blob digest), LRU first
        # Called with (ref, digest) for each name of an evicted layer, after it is evicted (outside
        # the store's lock): whoever caches its entries (the kernel, through the FUSE layer) drops them.
        self.on_evict: list[Callable[[str, str], None]] = []
        self._uses: dict[tuple[str, str], int] = {}
        self.accesses = AccessRecorder()  # `als optimize` switches it on through the control socket
        # The engines asking for layers (the FUSE layer reports each request's caller pid), to warn about
        # a containers/storage that loses lazily pulled layers.
        self.consumers = Consumers()
        self.warmer = Warmer(config, fetcher)
        self.predictor = self.warmer.predictor
        self.resolver = Resolver(config, client, fetcher, state, self.warmer, self._lock,
                                 held=self._held, keep=self._keep)

    def close(self) -> None:
        """Stop resolving and warming, without waiting for work under way (`als serve` unmounts first)."""
        self.resolver.close()
        self.warmer.close()
        self.consumers.close()

    # ---- the ALS protocol -------------------------------------------------------------
    def prepare(self, ref: str) -> None:
        """Start resolving ``ref`` in the background (called on the first lookup under it)."""
        self.resolver.prepare(ref)

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
        return self._ready_or(ref, digest, lambda: self.resolver.layer(ref, digest, cancel))

    def known_layer(self, ref: str, digest: str, cancel: threading.Event | None = None) -> Layer:
        """The layer of a node id the kernel kept across a restart: from saved metadata if need be
        (als/store/resolve.py ``Resolver.known_layer``)."""
        return self._ready_or(ref, digest, lambda: self.resolver.known_layer(ref, digest, cancel))

    def _ready_or(self, ref: str, digest: str, resolve: Callable[[], Layer]) -> Layer:
        """The layer held in memory, else ``resolve()``'s, then kept."""
        layer = self.ready_layer(ref, digest)
        if layer is None:
            layer = resolve()
            self._keep(layer)
        return layer

    def image(self, ref: str, cancel: threading.Event | None = None):
        """The image ``ref`` resolves to, as a lookup under it would find it (als/store/resolve.py)."""
        return self.resolver.image(ref, cancel)

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
        return list(self.resolver.resolutions())

    def layers(self) -> list[Layer]:
        """The layers held in memory, least recently looked up first."""
        with self._lock:
            return list(self._recent.values())

    def resolutions(self) -> dict[str, Resolution]:
        """The current resolution of each image reference looked up, for `als status`."""
        return self.resolver.resolutions()

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
            self.resolver.kept(ref, digest)
            evicted = self._evict_over_bound()
        self._after_eviction(evicted)

    def _held(self, ref: str, digest: str) -> Layer | None:
        """The layer held in memory under its image and blob digest (lock held)."""
        return self._recent.get((ref, digest))

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
            self.resolver.evicted(layer)
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
