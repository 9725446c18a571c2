"""Credentials the engine pushed to us with ``als auth-helper``.

Podman >= 5.1 runs registries.conf's ``additional-layer-store-auth-helper``
before a pull, and ``als auth-helper`` passes the credentials on to the
running store over its control socket. They live in this process's memory
only: never written to disk, logged, or returned by the control socket.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from ...reference import parse_reference
from .entries import Credentials, normalize_registry

MAX_PUSHED = 1024


@dataclass
class _Pushed:
    creds: Credentials
    at: float


class PushedCredentials:
    """Credentials received from ``als auth-helper``, by (registry, repository); memory only.

    Bounded (the oldest entry goes first), thread-safe. ``repr`` shows counts.
    """

    def __init__(self, limit: int = MAX_PUSHED):
        self._limit = limit
        self._lock = threading.Lock()
        self._by_repo: OrderedDict[tuple[str, str], _Pushed] = OrderedDict()

    def __repr__(self) -> str:
        return f"PushedCredentials({len(self)} repositories)"

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_repo)

    def add(self, ref: str, creds: Credentials) -> str:
        """Keep ``creds`` for the repository of image reference ``ref``; returns its name."""
        r = parse_reference(ref)
        key = (normalize_registry(r.registry), r.repository)
        with self._lock:
            self._by_repo.pop(key, None)
            self._by_repo[key] = _Pushed(creds, time.monotonic())
            while len(self._by_repo) > self._limit:
                self._by_repo.popitem(last=False)
        return f"{key[0]}/{key[1]}"

    def for_repository(self, registry: str, repository: str) -> Credentials | None:
        with self._lock:
            p = self._by_repo.get((normalize_registry(registry), repository))
        return p.creds if p else None

    def for_registry(self, registry: str) -> Credentials | None:
        """The most recently pushed credentials of any repository at ``registry``."""
        registry = normalize_registry(registry)
        with self._lock:
            for (reg, _), p in reversed(self._by_repo.items()):
                if reg == registry:
                    return p.creds
        return None

    def registries(self) -> list[str]:
        """Registry hosts we hold credentials for (no secrets), for status output."""
        with self._lock:
            return sorted({reg for reg, _ in self._by_repo})
