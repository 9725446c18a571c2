"""Where a blob really is, after the registry redirected us.

Registries backed by object storage answer a blob GET with a 307 to a
signed URL. A lazily pulled layer is read with thousands of range requests,
and going through the registry (and its token check) for each would double
the round trips, so the final URL is remembered per blob and range reads go
straight to it, until storage refuses it (the signature expired: 401, 403,
410, ...), when it is forgotten and the registry asked again. The manifest
is not read again: the blob's registry URL does not change.

Signed URLs are bearer secrets: they stay in memory and are logged without
their query string.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

MAX_LOCATIONS = 4096


class BlobLocations:
    """(registry host, blob path) -> final URL; bounded LRU, thread-safe."""

    def __init__(self, limit: int = MAX_LOCATIONS):
        self._limit = limit
        self._lock = threading.Lock()
        self._urls: OrderedDict[tuple[str, str], str] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._urls)

    def get(self, host: str, path: str) -> str | None:
        with self._lock:
            url = self._urls.get((host, path))
            if url is not None:
                self._urls.move_to_end((host, path))
            return url

    def remember(self, host: str, path: str, url: str) -> None:
        with self._lock:
            self._urls[(host, path)] = url
            self._urls.move_to_end((host, path))
            while len(self._urls) > self._limit:
                self._urls.popitem(last=False)

    def forget(self, host: str, path: str, url: str | None = None) -> None:
        """Drop the entry (only if it is still ``url``, when given: another thread may have renewed it)."""
        with self._lock:
            if url is None or self._urls.get((host, path)) == url:
                self._urls.pop((host, path), None)
