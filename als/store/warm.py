"""Warming a layer as soon as it resolves, so that a container's first reads find its data local.

Three things run once per layer, on its first resolution (a layer rebuilt
after eviction ran them already): the prefetch of its prioritised front (the
landmark `als optimize` writes, else the first ``fetch.prefetch_size`` bytes),
the startup prediction of the image's program (als/layer/startup.py), and the
background fetch of the rest. All of it is an optimisation: a read fetches
whatever warming missed, so a failure here is logged and nothing more.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from als.config import Config
from als.fetch import background
from als.fetch.fetcher import ChunkFetcher
from als.fetch.source import BlobSource
from als.fetch.pace import Pace
from als.formats import estargz
from als.formats import toc as T
from als.layer import startup
from als.layer.resolved import Layer
from als import metrics

log = logging.getLogger("als.store")

# Layers prefetched at once: each is one long request (or a few), and a container start needs them all.
PREFETCHES = 8


def prefetch_end(toc: T.TOC, prefetch_size: int) -> int:
    """Where in the blob what to fetch as soon as the layer resolves ends: at its landmark if it
    has one, else after the configured size (0: nothing). Asked before the layer's tree is built
    from (and takes) the TOC's entries."""
    names = {e.name: e for e in toc.entries if e.name in (estargz.PREFETCH_LANDMARK,
                                                           estargz.NO_PREFETCH_LANDMARK)}
    if estargz.NO_PREFETCH_LANDMARK in names:
        return 0
    landmark = names.get(estargz.PREFETCH_LANDMARK)
    if landmark is not None and landmark.chunks:
        return landmark.chunks[0].blob_start
    return prefetch_size


def prefetch_chunks(source: BlobSource, end: int) -> list[T.Chunk]:
    """The chunks before ``end`` (``prefetch_end``)."""
    return [c for c in source.chunks if c.blob_end <= end] if end > 0 else []


class Warmer:
    """Prefetch, prediction and background fetch of newly resolved layers, on threads of its own.

    Its pools are apart from the resolver's so that a long background fetch
    never delays the resolution of another image's layers. Prefetches run at
    once, each on a thread of its own (a container start waits on all of
    them); the background fetches that follow them queue for
    ``fetch.background_layers`` threads, which bound how many layers stream at once.
    """

    def __init__(self, config: Config, fetcher: ChunkFetcher):
        self.config = config
        self.fetcher = fetcher
        self._prefetches = ThreadPoolExecutor(max_workers=PREFETCHES, thread_name_prefix="als-prefetch")
        self._pool = ThreadPoolExecutor(max_workers=max(config.fetch.background_layers, 1),
                                        thread_name_prefix="als-background")
        self._stop = threading.Event()
        # The FUSE layer tells it which program ran, through the store (``Store.predictor``).
        self.predictor = (startup.Predictor(fetcher, config.fetch.prefetch_request)
                          if config.fetch.predict else None)

    def start(self, layer: Layer, entrypoint: list[str]) -> None:
        """Start warming a layer resolved for the first time (``entrypoint``: its image's program)."""
        if self.predictor is not None and not layer.prefetch:  # an optimized layer prefetches its own
            self.predictor.start(layer, entrypoint)
        # Reads counted from now: the background fetch waits for the container that follows the pull.
        since = self.fetcher.container_reads()
        try:
            if layer.prefetch:
                self._prefetches.submit(self._prefetch, layer, since)
            elif self.config.fetch.background:
                self._pool.submit(self._fill, layer, since)
        except RuntimeError:  # closed: the store is stopping
            pass

    def close(self) -> None:
        """Stop background fetches at their next step; queued ones never start."""
        self._stop.set()
        self._prefetches.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.predictor is not None:
            self.predictor.close()

    def _prefetch(self, layer: Layer, since: int) -> None:
        """Fetch the layer's prioritised front, then queue its background fetch."""
        label = layer.source.label
        front, layer.front = layer.front, None  # taken once: its bytes go with the prefetch
        try:
            t0 = time.monotonic()
            n = self.fetcher.prefetch(layer.source, layer.prefetch, self.config.fetch.prefetch_request, front)
            log.info("%s: prefetched %d chunks (%d bytes) in %.2fs", label, len(layer.prefetch), n,
                     time.monotonic() - t0)
        except Exception as e:  # warming is an optimisation: reads fetch what it missed
            log.warning("%s: prefetch failed: %s", label, e)
        if self.config.fetch.background and not self._stop.is_set():
            try:
                self._pool.submit(self._fill, layer, since)
            except RuntimeError:  # closed meanwhile
                pass

    def _fill(self, layer: Layer, since: int) -> None:
        """Stream the rest of the layer into the cache in the background, once a container's start
        is over (``since``: container reads when the layer resolved)."""
        label = layer.source.label
        if self._stop.is_set():
            return
        try:
            t0 = time.monotonic()
            left = sum(c.blob_end - c.blob_start for c in layer.source.chunks
                       if not self.fetcher.cache.contains(c.digest))
            with metrics.background_fetch(label, left) as progress:
                f = self.config.fetch
                n = background.fill(self.fetcher, layer.source, self._stop, f.background_step,
                                    progress=progress.advance,
                                    pace=Pace(f.background_quiet, f.background_delay), since=since)
            if not self._stop.is_set():
                log.info("%s: background fetch done: %d bytes in %.2fs", label, n, time.monotonic() - t0)
        except Exception as e:  # warming is an optimisation: reads fetch what it missed
            log.warning("%s: background fetch failed: %s", label, e)
