"""The Prometheus exporter: the metrics of `als/metrics.py` over HTTP, and the store's gauges read when scraped.

The exporter is off by default. ``[metrics] address`` turns it on, on a
loopback TCP port or a unix socket only: metrics name registries and are not
meant for the network at large, and a scraper on another host should go
through something the operator controls.
"""

from __future__ import annotations

import http.server
import ipaddress
import logging
import os
import socket
import socketserver
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from prometheus_client import disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector

from als.errors import ConfigError
from als.metrics import REGISTRY

log = logging.getLogger("als.metrics")

class _StoreCollector(Collector):
    """Cache and store gauges, read when scraped instead of updated on every access."""

    def __init__(self, cache, inflight: Callable[[], int], images: Callable[[], int],
                 layers: Callable[[], int]):
        self.cache, self.inflight, self.images, self.layers = cache, inflight, images, layers

    def collect(self) -> Iterable:
        c = self.cache
        stats = c.stats() if hasattr(c, "stats") else None
        hits = stats.hits if stats else c.hits
        misses = stats.misses if stats else c.misses
        yield CounterMetricFamily("als_cache_hits", "Chunk reads served from the cache.", value=hits)
        yield CounterMetricFamily("als_cache_misses", "Chunk reads the cache could not serve.", value=misses)
        yield CounterMetricFamily("als_cache_corrupt", "Cache entries dropped because they no longer "
                                  "matched their digest.", value=stats.corrupt if stats else c.corrupt)
        if stats is not None:
            yield GaugeMetricFamily("als_cache_bytes", "Bytes of chunks in the disk cache.", value=stats.bytes)
            yield GaugeMetricFamily("als_cache_entries", "Chunks in the disk cache.", value=stats.entries)
            yield GaugeMetricFamily("als_cache_limit_bytes", "The disk cache limit (0: none).",
                                    value=stats.max_bytes)
            yield CounterMetricFamily("als_cache_evictions", "Chunks evicted to stay under the limit.",
                                      value=stats.evicted)
        yield GaugeMetricFamily("als_inflight_chunks", "Chunks being fetched right now.", value=self.inflight())
        yield GaugeMetricFamily("als_images", "Image references looked up since the store started.",
                                value=self.images())
        yield GaugeMetricFamily("als_layers", "Layers resolved and held in memory (those no container "
                                "uses are bounded by resolve.max_idle_layers).", value=self.layers())


_watched: Collector | None = None


def watch_store(store) -> None:
    """Export ``store``'s cache and in-flight numbers (replacing any store watched before)."""
    global _watched
    collector = _StoreCollector(store.fetcher.cache, store.fetcher.inflight, lambda: len(store.refs()),
                                lambda: len(store.layers()))
    if _watched is not None:
        REGISTRY.unregister(_watched)
    REGISTRY.register(collector)
    _watched = collector


@dataclass(frozen=True)
class Address:
    """Where the exporter listens: ``path`` for a unix socket, else ``host`` and ``port``."""

    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address | None:
    """``""`` (off), ``unix:/path`` (or ``/path``), or a loopback ``host:port``; else ConfigError."""
    text = text.strip()
    if not text:
        return None
    if text.startswith("unix:") or text.startswith("/"):
        path = text[5:] if text.startswith("unix:") else text
        if not path.startswith("/"):
            raise ConfigError(f"metrics.address {text!r}: a unix socket needs an absolute path")
        return Address(path=path)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"metrics.address {text!r}: expected HOST:PORT or unix:/path")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"metrics.address {text!r}: only a loopback address (127.0.0.0/8, [::1]) "
                          "or a unix socket is allowed")
    return Address(host=host, port=int(port))


class _TCPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _TCP6Server(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class MetricsServer:
    """The HTTP exporter (``GET /metrics``, any path answers) in a daemon thread."""

    def __init__(self, address: Address):
        self.address = address
        handler = MetricsHandler.factory(REGISTRY)
        if address.path:
            path = Path(address.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            old = os.umask(0o117)  # owner and group may scrape
            try:
                self._server = _UnixServer(str(path), handler)
            finally:
                os.umask(old)
        else:
            cls = _TCP6Server if ":" in address.host else _TCPServer
            self._server = cls((address.host, address.port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="als-metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        log.info("metrics at %s", self.address)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self.address.path:
            Path(self.address.path).unlink(missing_ok=True)


def serve(text: str) -> MetricsServer | None:
    """Start the exporter configured by ``text`` (``[metrics] address``); None when it is off."""
    address = parse_address(text)
    if address is None:
        return None
    # The daemon owns its process: drop the *_created series, which only double every counter.
    disable_created_metrics()
    try:
        return MetricsServer(address).start()
    except OSError as e:
        raise ConfigError(f"metrics.address {text!r}: cannot listen: {e}") from None
