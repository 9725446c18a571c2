"""The registry client as the operator sees it: bytes, latency and errors per registry.

``InstrumentedClient`` wraps the store's ``RegistryClient`` without changing
what it does: every pull-side call is timed and counted into the metrics, and
every failure (after the client's own retries) is also kept for a while in
``RecentErrors``, which `als status` shows as "registry errors in the last
minutes". Everything else passes through untouched.

The registry label is the image's registry as its reference names it (a
mirror that served the bytes is not told apart): that is the name an operator
knows the image by, and it keeps the label set small.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import asdict, dataclass

from als import metrics


@dataclass(frozen=True)
class RegistryErrorEvent:
    time: float  # unix time
    registry: str
    what: str  # "manifest", "blob", "range"
    message: str  # the client's message: names the image and object, never a credential


class RecentErrors:
    """The last ``limit`` registry failures, for `als status`."""

    def __init__(self, limit: int = 200):
        self._events: collections.deque[RegistryErrorEvent] = collections.deque(maxlen=limit)
        self._lock = threading.Lock()

    def add(self, registry: str, what: str, message: str) -> None:
        with self._lock:
            self._events.append(RegistryErrorEvent(time.time(), registry, what, message[:1000]))

    def since(self, seconds: float) -> list[dict]:
        """Failures of the last ``seconds``, oldest first."""
        cutoff = time.time() - seconds
        with self._lock:
            return [asdict(e) for e in self._events if e.time >= cutoff]


class InstrumentedClient:
    """A RegistryClient that reports to ``als.metrics`` and keeps recent failures."""

    def __init__(self, client, errors: RecentErrors | None = None):
        self._client = client
        self.errors = errors if errors is not None else RecentErrors()

    def __getattr__(self, name):  # push, streams, close, conf, ...: unchanged
        return getattr(self._client, name)

    def _call(self, ref, what: str, fn, *args, timed: bool = False, size_of=len):
        registry = ref.registry
        t0 = time.monotonic()
        try:
            result = fn(ref, *args)
        except Exception as e:
            metrics.registry_error(registry)
            self.errors.add(registry, what, str(e))
            raise
        size = len(result.data) if what == "manifest" else size_of(result)
        metrics.registry_fetch(registry, size, time.monotonic() - t0 if timed else None)
        return result

    def get_manifest(self, ref, reference=None):
        return self._call(ref, "manifest", self._client.get_manifest, reference)

    def get_blob(self, ref, digest, max_size):
        return self._call(ref, "blob", self._client.get_blob, digest, max_size)

    def read_range(self, ref, digest, start, end):
        return self._call(ref, "range", self._client.read_range, digest, start, end, timed=True)

    def read_tail(self, ref, digest, length):
        return self._call(ref, "range", self._client.read_tail, digest, length, timed=True,
                          size_of=lambda got: len(got[1]) if got else 0)

    def stream_range(self, ref, digest, start, end, sink):
        return self._call(ref, "range", self._client.stream_range, digest, start, end, sink, timed=True,
                          size_of=int)
