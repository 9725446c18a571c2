"""The kubelet's ``config.json``: credentials a Kubernetes node was given for its images.

CRI-O on a Kubernetes node may have its pull credentials only there, keyed
not like an auth file but the kubelet's way (host globs such as
``*.example.com``, path prefixes), so it has a matcher of its own.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .entries import Credentials, decode_entry, normalize_registry

log = logging.getLogger("als.registry")

KUBELET_CONFIG = Path("/var/lib/kubelet/config.json")  # where the kubelet keeps it


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
    return decode_entry(best[2], path, best[1], plain=True)


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
