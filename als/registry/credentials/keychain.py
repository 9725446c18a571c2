"""Where the store finds registry credentials, in one documented order.

The store serves Podman and CRI-O, and neither hands it credentials on every
request, so it looks where they keep them (README, "Registries and
credentials"), first match wins:

1. credentials the engine pushed with ``als auth-helper`` (Podman >= 5.1's
   ``additional-layer-store-auth-helper``) for this very repository;
2. CRI-O's ``global_auth_file``, when ``registry.global_auth_file`` names it;
3. registries.conf ``credential-helpers``, in order; the default
   ``containers-auth.json`` means Podman's auth files (auth.py), with their
   ``credHelpers``/``credsStore``;
4. the kubelet's ``config.json`` (``registry.kubelet_config``), with its
   glob keys (``*.example.com``);
5. credentials pushed by ``als auth-helper`` for another repository of the
   same registry.

Pushed credentials live in this process's memory only: they are never
written to disk, logged, or returned by the control socket.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..reference import parse_reference
from .auth import AuthFile, Credentials, _decode_entry, default_auth_files, find_credentials, normalize_registry
from .credhelper import HelperCache

log = logging.getLogger("als.registry")

AUTH_FILES_HELPER = "containers-auth.json"  # registries.conf's name for "the auth files"
KUBELET_CONFIG = Path("/var/lib/kubelet/config.json")
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


class Keychain:
    """The credential lookup the registry client calls: ``keychain(host, repository)``."""

    def __init__(self, *, helpers: Sequence[str] | None = None,
                 global_auth_file: str | Path | None = None,
                 kubelet_config: str | Path | None = None,
                 auth_files: Sequence[AuthFile] | None = None,
                 helper_timeout: float = 10.0, helper_ttl: float = 10.0):
        self.helpers = list(helpers) if helpers is not None else [AUTH_FILES_HELPER]
        self.global_auth_file = Path(global_auth_file) if global_auth_file else None
        self.kubelet_config = Path(kubelet_config) if kubelet_config else None
        self._auth_files = list(auth_files) if auth_files is not None else None
        self.helper_cache = HelperCache(timeout=helper_timeout, ttl=helper_ttl)
        self.pushed = PushedCredentials()

    def __repr__(self) -> str:
        return (f"Keychain(helpers={self.helpers}, global_auth_file={self.global_auth_file}, "
                f"kubelet_config={self.kubelet_config}, {self.pushed!r})")

    def __call__(self, host: str, repository: str) -> Credentials | None:
        found = self.lookup(host, repository)
        return found[0] if found else None

    def lookup(self, host: str, repository: str) -> tuple[Credentials, str] | None:
        """(credentials, where they came from) for ``host/repository``, or None."""
        registry = normalize_registry(host)
        creds = self.pushed.for_repository(registry, repository)
        if creds is not None:
            return self._found(creds, "als auth-helper", registry, repository)
        if self.global_auth_file is not None:
            creds = find_credentials(registry, repository, [AuthFile(self.global_auth_file)],
                                     helper=self.helper_cache.get)
            if creds is not None:
                return self._found(creds, f"global auth file {self.global_auth_file}", registry,
                                   repository)
        for helper in self.helpers:
            if helper == AUTH_FILES_HELPER:
                files = self._auth_files if self._auth_files is not None else default_auth_files()
                creds = find_credentials(registry, repository, files, helper=self.helper_cache.get)
                where = "the auth files"
            else:
                creds = self.helper_cache.get(helper, registry)
                where = f"credential helper {helper} (registries.conf)"
            if creds is not None:
                return self._found(creds, where, registry, repository)
        if self.kubelet_config is not None:
            creds = kubelet_credentials(self.kubelet_config, registry, repository)
            if creds is not None:
                return self._found(creds, f"kubelet config {self.kubelet_config}", registry,
                                   repository)
        creds = self.pushed.for_registry(registry)
        if creds is not None:
            return self._found(creds, "als auth-helper (same registry)", registry, repository)
        return None

    @staticmethod
    def _found(creds: Credentials, where: str, registry: str,
               repository: str) -> tuple[Credentials, str]:
        log.debug("credentials for %s/%s: %s from %s", registry, repository, creds.describe(), where)
        return creds, where


# --------------------------------------------------------------------------
# The kubelet's config.json
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class _KubeletKey:
    """One parsed key: host labels (globs allowed), port, path prefix."""

    labels: tuple[str, ...]
    port: str
    path: tuple[str, ...]

    @property
    def has_glob(self) -> bool:
        return any(any(c in label for c in "*?[") for label in self.labels)


def kubelet_credentials(path: Path, registry: str, repository: str) -> Credentials | None:
    """The best entry of the kubelet's config.json for ``registry/repository``, or None.

    Keys are matched as the kubelet matches them: an optional scheme and a
    trailing ``/v1/`` or ``/v2/`` are ignored, each dot-separated host label
    may be a glob (``*.example.com`` matches one label), ports must be equal,
    and the key's path must be a prefix of the repository (at a ``/``
    boundary). Among matches, an exact host beats a glob, then the longer path.
    """
    entries = _kubelet_entries(path)
    target = _kubelet_key(f"{registry}/{repository}")
    if target is None:
        return None
    best: tuple[tuple[int, int], str, dict] | None = None
    for key, entry in entries.items():
        k = _kubelet_key(key)
        if k is None or not _kubelet_matches(k, target):
            continue
        rank = (0 if k.has_glob else 1, len(k.path))
        if best is None or rank > best[0]:
            best = (rank, key, entry)
    if best is None:
        return None
    return _decode_entry(best[2], path, best[1], plain=True)


def _kubelet_entries(path: Path) -> dict[str, dict]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.debug("cannot read kubelet config %s: %s", path, exc.strerror)
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        log.warning("ignoring kubelet config %s: it is not valid JSON", path)
        return {}
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        log.warning("ignoring kubelet config %s: no 'auths' object", path)
        return {}
    return {k: v for k, v in auths.items() if isinstance(k, str) and isinstance(v, dict)}


def _kubelet_key(key: str) -> _KubeletKey | None:
    k = key.strip()
    for scheme in ("https://", "http://"):
        if k.lower().startswith(scheme):
            k = k[len(scheme):]
    hostport, _, path = k.partition("/")
    parts = tuple(p for p in path.split("/") if p)
    if parts[-1:] in (("v1",), ("v2",)):
        parts = parts[:-1]
    host, port = hostport, ""
    if ":" in hostport and not hostport.endswith("]"):
        host, _, port = hostport.rpartition(":")
    if not host:
        return None
    host = normalize_registry(host.lower())
    return _KubeletKey(labels=tuple(host.split(".")), port=port, path=parts)


def _kubelet_matches(key: _KubeletKey, target: _KubeletKey) -> bool:
    if len(key.labels) != len(target.labels) or key.port != target.port:
        return False
    if not all(fnmatch.fnmatchcase(t, g) for g, t in zip(key.labels, target.labels)):
        return False
    return target.path[:len(key.path)] == key.path
