"""Prometheus metrics: what the store did, in numbers an operator can graph and alert on.

Every metric lives in this module's own registry (``REGISTRY``), never in
prometheus_client's global one, so importing als into another program adds
nothing to its metrics. Every package reports here, from the registry client
to the FUSE layer, through the small functions below (or the metric objects
themselves), so this module imports nothing of als; `als/ops/exporter.py`
serves the numbers.

For developers feeding the background fetch gauges::

    with metrics.background_fetch(label, total_bytes) as progress:
        ...
        progress.advance(nbytes)   # after each verified request
"""

from __future__ import annotations

import errno as errno_names
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

LAYERS_RESOLVED = Counter("als_layers_resolved", "Layers resolved and served lazily.", registry=REGISTRY)
LAYERS_DECLINED = Counter("als_layers_declined",
                          "Layers that could not be served lazily (the engine pulled them itself).",
                          registry=REGISTRY)
LAYERS_EVICTED = Counter("als_layers_evicted",
                         "Unused layers dropped from memory (resolve.max_idle_layers); rebuilt from the state "
                         "directory when looked up again.", registry=REGISTRY)
REGISTRY_BYTES = Counter("als_registry_fetched_bytes",
                         "Bytes received from registries (manifests, configs, TOCs, chunks, blob exports), "
                         "by the image's registry.", ["registry"], registry=REGISTRY)
REGISTRY_ERRORS = Counter("als_registry_errors", "Registry requests that failed after their retries.",
                          ["registry"], registry=REGISTRY)
FETCH_SECONDS = Histogram("als_registry_fetch_seconds",
                          "Time to fetch a byte range of a layer blob, retries included.", ["registry"],
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                          registry=REGISTRY)
FUSE_OPS = Counter("als_fuse_operations", "FUSE operations answered, by operation.", ["op"], registry=REGISTRY)
FUSE_ERRORS = Counter("als_fuse_errors",
                      "FUSE operations answered with an error, by operation and errno name "
                      "(ENOENT on lookups is normal: it is how absent names are answered).",
                      ["op", "errno"], registry=REGISTRY)
BACKGROUND_ACTIVE = Gauge("als_background_fetch_layers", "Layers being fetched in the background now.",
                          registry=REGISTRY)
BACKGROUND_REMAINING = Gauge("als_background_fetch_remaining_bytes",
                             "Compressed bytes the running background fetches still have to fetch.",
                             registry=REGISTRY)
BACKGROUND_FETCHED = Counter("als_background_fetched_bytes", "Bytes fetched by background fetches.",
                             registry=REGISTRY)


# ---- the reporting API ---------------------------------------------------------------
def layer_resolved() -> None:
    LAYERS_RESOLVED.inc()


def layer_declined() -> None:
    LAYERS_DECLINED.inc()


def layer_evicted() -> None:
    LAYERS_EVICTED.inc()


def registry_fetch(registry: str, nbytes: int, seconds: float | None = None) -> None:
    """A successful registry request: ``seconds`` is given for blob range reads only."""
    REGISTRY_BYTES.labels(registry).inc(nbytes)
    if seconds is not None:
        FETCH_SECONDS.labels(registry).observe(seconds)


def registry_error(registry: str) -> None:
    REGISTRY_ERRORS.labels(registry).inc()


def fuse_op_counter(op: str):
    """The counter child for one FUSE operation, resolved once (labels() costs a lock and a dict)."""
    return FUSE_OPS.labels(op)


def fuse_error(op: str, err: int) -> None:
    FUSE_ERRORS.labels(op, errno_names.errorcode.get(err, str(err))).inc()


class BackgroundProgress:
    """One layer's background fetch, as the gauges see it; use through ``background_fetch``."""

    def __init__(self, label: str, total_bytes: int):
        self.label = label
        self.total = max(int(total_bytes), 0)
        self.done = 0
        self._lock = threading.Lock()

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more were fetched (never counts past the total announced)."""
        with self._lock:
            step = max(min(int(nbytes), self.total - self.done), 0)
            self.done += step
        BACKGROUND_REMAINING.dec(step)
        BACKGROUND_FETCHED.inc(max(int(nbytes), 0))

    def __enter__(self) -> "BackgroundProgress":
        with _background_lock:
            _background[id(self)] = self
        BACKGROUND_ACTIVE.inc()
        BACKGROUND_REMAINING.inc(self.total)
        return self

    def __exit__(self, *exc) -> None:
        with _background_lock:
            _background.pop(id(self), None)
        BACKGROUND_ACTIVE.dec()
        with self._lock:
            left = self.total - self.done
            self.done = self.total
        BACKGROUND_REMAINING.dec(left)


_background: dict[int, BackgroundProgress] = {}
_background_lock = threading.Lock()


def background_fetch(label: str, total_bytes: int) -> BackgroundProgress:
    """A context manager for one layer's background fetch of ``total_bytes`` (compressed)."""
    return BackgroundProgress(label, total_bytes)


def background_fetches() -> list[dict]:
    """The running background fetches, for `als status`."""
    with _background_lock:
        running = list(_background.values())
    return [{"layer": p.label, "fetched_bytes": p.done, "total_bytes": p.total} for p in running]
