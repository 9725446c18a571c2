"""TLS per registry host, as Podman sets it up: system CAs plus ``certs.d``.

containers/image trusts the system's CA store and, for a registry
``host[:port]``, the first existing directory ``<dir>/<host[:port]>/`` of
``~/.config/containers/certs.d``, ``/etc/containers/certs.d`` and
``/etc/docker/certs.d``: every ``*.crt`` in it is an extra CA, and each
``*.cert`` with its ``*.key`` is a client certificate. We do the same, with
``registry.certs_dir`` replacing that list by one directory.

requests trusts certifi's bundle by default, not the system store; the
adapter here hands urllib3 an ``ssl.SSLContext`` of our own per host (built
from OpenSSL's default paths, so ``SSL_CERT_FILE``/``SSL_CERT_DIR`` work as
for any OpenSSL program), which also keeps connection pools per host and
trust setting, so pooling keeps working.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

from requests.adapters import HTTPAdapter

from ..errors import ConfigError

log = logging.getLogger("als.registry")

DEFAULT_CERT_DIRS = ("~/.config/containers/certs.d", "/etc/containers/certs.d", "/etc/docker/certs.d")
_DOCKER_HUB_HOSTS = {"registry-1.docker.io", "index.docker.io"}
_RESCAN = 10.0  # seconds between checks of a host's certs.d directory for changes


@dataclass(frozen=True)
class HostCerts:
    """What a host's certs.d directory holds (sorted paths); empty when there is none."""

    directory: Path | None = None
    cas: tuple[Path, ...] = ()
    client: tuple[tuple[Path, Path], ...] = ()  # (certificate, key) pairs


def cert_dirs(override: str | Path | None = None) -> list[Path]:
    """The per-host parent directories to search, in order."""
    if override:
        return [Path(override)]
    return [Path(os.path.expanduser(d)) for d in DEFAULT_CERT_DIRS]


def host_certs(netloc: str, dirs: Sequence[Path]) -> HostCerts:
    """The first existing ``<dir>/<netloc>/`` and its files, as containers/image picks it.

    Raises ConfigError for a ``.cert`` without its ``.key`` or the other way
    round, as Podman refuses those too.
    """
    name = "docker.io" if netloc in _DOCKER_HUB_HOSTS else netloc
    if not name or "/" in name or name in (".", ".."):
        return HostCerts()
    for parent in dirs:
        d = parent / name
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            continue
        except PermissionError:
            log.debug("cannot read certificate directory %s: permission denied", d)
            continue
        cas = tuple(d / n for n in names if n.endswith(".crt"))
        pairs = []
        for n in names:
            if n.endswith(".cert"):
                key = n[:-len(".cert")] + ".key"
                if key not in names:
                    raise ConfigError(f"{d}: client certificate {n} has no key {key} (a CA "
                                      "certificate must be named *.crt)")
                pairs.append((d / n, d / key))
            elif n.endswith(".key") and n[:-len(".key")] + ".cert" not in names:
                raise ConfigError(f"{d}: key {n} has no client certificate "
                                  f"{n[:-len('.key')]}.cert")
        return HostCerts(directory=d, cas=cas, client=tuple(pairs))
    return HostCerts()


def build_context(certs: HostCerts, verify: bool) -> ssl.SSLContext:
    """System CAs + the host's CAs, its client certificate; no verification if not ``verify``."""
    if verify:
        ctx = ssl.create_default_context()  # OpenSSL's default paths: the system store
    else:
        # Nothing is verified, so the system store (30-40 ms to load, on the first request to an
        # insecure registry: its HTTPS probe) would only be read for nothing.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    for ca in certs.cas:
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot use CA certificate {ca}: {_reason(exc)}") from None
    if certs.client:
        cert, key = certs.client[0]
        if len(certs.client) > 1:
            log.info("%s holds %d client certificates; using %s", certs.directory,
                     len(certs.client), cert.name)
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot use client certificate {cert} with key {key}: "
                              f"{_reason(exc)}") from None
    return ctx


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__


@dataclass
class _Entry:
    ctx: ssl.SSLContext
    fingerprint: tuple
    checked: float


class TLSContexts:
    """One SSLContext per (host, verify), rebuilt when the host's certs.d changes.

    Reusing the same context object matters: urllib3 keys its connection
    pools by it, so a new object per request would defeat keep-alive.
    """

    def __init__(self, certs_dir: str | Path | None = None, rescan: float = _RESCAN):
        self.dirs = cert_dirs(certs_dir)
        self.rescan = rescan
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, bool], _Entry] = {}

    def context(self, netloc: str, verify: bool) -> ssl.SSLContext:
        key = (netloc, verify)
        now = time.monotonic()
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None and now - entry.checked < self.rescan:
                return entry.ctx
        certs = host_certs(netloc, self.dirs)
        fp = _fingerprint(certs)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None and entry.fingerprint == fp:
                entry.checked = now
                return entry.ctx
        ctx = build_context(certs, verify)
        if certs.directory is not None:
            log.info("registry %s: using %s (%d CA certificates, %s)", netloc, certs.directory,
                     len(certs.cas), "a client certificate" if certs.client else
                     "no client certificate")
        with self._lock:
            self._cache[key] = _Entry(ctx, fp, now)
        return ctx

    def client_cert(self, netloc: str) -> Path | None:
        """The client certificate we present to ``netloc``, if any (for messages)."""
        certs = host_certs(netloc, self.dirs)
        return certs.client[0][0] if certs.client else None

    def describe(self, netloc: str) -> str:
        """Where trust for ``netloc`` comes from, for error messages."""
        name = "docker.io" if netloc in _DOCKER_HUB_HOSTS else netloc
        return " or ".join(str(d / name) for d in self.dirs)


def _fingerprint(certs: HostCerts) -> tuple:
    files = [*certs.cas, *(p for pair in certs.client for p in pair)]
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append((str(f), st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((str(f), 0, 0))
    return (str(certs.directory), tuple(out))


class TLSAdapter(HTTPAdapter):
    """An HTTPAdapter whose HTTPS connections use :class:`TLSContexts` for trust and client certs."""

    def __init__(self, contexts: TLSContexts, **kwargs):
        self.contexts = contexts
        super().__init__(**kwargs)

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        if host_params.get("scheme") == "https":
            netloc = urlsplit(request.url).netloc.rpartition("@")[2]
            checked = verify is not False
            pool_kwargs = {"ssl_context": self.contexts.context(netloc, checked),
                           "cert_reqs": "CERT_REQUIRED" if checked else "CERT_NONE"}
        return host_params, pool_kwargs

    def cert_verify(self, conn, url, verify, cert):
        # Our SSLContext carries trust and client certificates; requests would
        # otherwise point the pool at certifi's bundle.
        if url.lower().startswith("https:"):
            return
        super().cert_verify(conn, url, verify, cert)
