"""Podman's auth files: which files, in which order, and what one entry means.

Podman before 5.1 never hands its credentials to an Additional Layer Store
(and 5.1+ only through a helper, als/ops/authhelper.py), so the store looks
where ``podman login`` and ``docker login`` leave them, in the order
containers/image reads them. Which sources are asked, in which order, is
keychain.py's business; this module reads one list of auth files.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .credhelper import HelperError, helper_get
from .entries import Credentials, decode_entry, normalize_registry

log = logging.getLogger("als.registry")


@dataclass(frozen=True)
class AuthFile:
    """One file to search. ``legacy`` marks ~/.dockercfg (registries at top level)."""

    path: Path
    legacy: bool = False


def default_auth_files() -> list[AuthFile]:
    """The files containers/image (and so Podman) reads credentials from, in order.

    ``$REGISTRY_AUTH_FILE`` takes the place of the per-session
    ``${XDG_RUNTIME_DIR}/containers/auth.json`` (``/run/containers/<uid>/...``
    without XDG_RUNTIME_DIR), and, being an explicit choice, also turns off the
    legacy ``~/.dockercfg``; the per-user and Docker files are always read.
    """
    env = os.environ
    home = Path(env.get("HOME") or Path.home())
    files: list[AuthFile] = []
    explicit = env.get("REGISTRY_AUTH_FILE")
    if explicit:
        files.append(AuthFile(Path(explicit)))
    elif env.get("XDG_RUNTIME_DIR"):
        files.append(AuthFile(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json"))
    else:
        files.append(AuthFile(Path(f"/run/containers/{os.getuid()}/auth.json")))
    config_home = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    files.append(AuthFile(config_home / "containers" / "auth.json"))
    docker_config = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else home / ".docker"
    files.append(AuthFile(docker_config / "config.json"))
    if not explicit:
        files.append(AuthFile(home / ".dockercfg", legacy=True))
    return files


def _normalize_key(key: str) -> tuple[str, bool]:
    """(normalised key, had a URL scheme). Keys with a scheme are legacy: host only."""
    k = key.strip()
    for scheme in ("https://", "http://"):
        if k.lower().startswith(scheme):
            host = k[len(scheme):].split("/", 1)[0]
            return normalize_registry(host), True
    k = k.rstrip("/")
    host, sep, path = k.partition("/")
    return normalize_registry(host) + (f"/{path}" if sep else ""), False


HelperLookup = Callable[[str, str], "Credentials | None"]  # (helper name, registry) -> creds


def find_credentials(registry: str, repository: str,
                     files: list[AuthFile] | None = None,
                     helper: HelperLookup | None = None) -> Credentials | None:
    """Credentials for ``registry/repository``, or None.

    The first file with a matching entry wins, as in containers/image. In a
    file, a ``credHelpers`` entry for the registry host is asked first (and,
    as in containers/image, only by host: helpers hold no per-namespace
    credentials); then the most specific ``auths`` key (``registry/ns/repo``
    before ``registry/ns`` before ``registry``); then the file's ``credsStore``
    (Docker's default helper, which containers/image ignores). ``files``
    defaults to :func:`default_auth_files`; ``helper`` runs a credential
    helper (default: :func:`credhelper.helper_get`, uncached).
    """
    registry = normalize_registry(registry)
    parts = [p for p in repository.split("/") if p]
    keys = [f"{registry}/{'/'.join(parts[:i])}" for i in range(len(parts), 0, -1)] + [registry]
    for f in default_auth_files() if files is None else files:
        content = _load_auth_file(f)
        name = content.helpers.get(registry)
        if name:
            creds = _ask_helper(helper, name, registry, f.path, "credHelpers")
            if creds is not None:
                return creds
            continue  # containers/image: a credHelpers entry settles this file
        for key in keys:
            if key in content.entries:
                creds = decode_entry(content.entries[key], f.path, key)
                if creds is not None:
                    log.debug("credentials for %s/%s: %s from %s", registry, repository,
                              creds.describe(), f.path)
                    return creds
        if content.store:
            creds = _ask_helper(helper, content.store, registry, f.path, "credsStore")
            if creds is not None:
                return creds
    return None


def _ask_helper(helper: HelperLookup | None, name: str, registry: str, path: Path,
                field_name: str) -> Credentials | None:
    try:
        creds = helper(name, registry) if helper is not None else helper_get(name, registry)
    except HelperError as exc:
        log.warning("%s (named by %s in %s); going on without it", exc, field_name, path)
        return None
    if creds is not None:
        log.debug("credentials for %s: %s from credential helper %s (%s in %s)", registry,
                  creds.describe(), name, field_name, path)
    return creds


@dataclass
class _AuthFileContent:
    """What one auth file says: normalised key -> entry, and the helpers it names."""

    entries: dict[str, dict] = field(default_factory=dict)
    helpers: dict[str, str] = field(default_factory=dict)  # credHelpers: registry -> helper name
    store: str = ""  # credsStore: the helper for every registry


def _load_auth_file(f: AuthFile) -> _AuthFileContent:
    """Parse ``f``. Missing, unreadable or malformed files are empty."""
    empty = _AuthFileContent()
    try:
        raw = f.path.read_bytes()
    except FileNotFoundError:
        return empty
    except OSError as exc:
        log.debug("cannot read auth file %s: %s", f.path, exc.strerror)
        return empty
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        log.warning("ignoring auth file %s: it is not valid JSON", f.path)
        return empty
    if not isinstance(doc, dict):
        log.warning("ignoring auth file %s: it is not a JSON object", f.path)
        return empty
    out = _AuthFileContent()
    if f.legacy:
        auths = doc
    else:
        auths = doc.get("auths", {})
        helpers = doc.get("credHelpers", {})
        if isinstance(helpers, dict):
            out.helpers = {normalize_registry(k): v for k, v in helpers.items()
                           if isinstance(k, str) and isinstance(v, str) and _helper_name_ok(v)}
        else:
            log.warning("ignoring 'credHelpers' in auth file %s: it is not a JSON object", f.path)
        store = doc.get("credsStore", "")
        if isinstance(store, str) and _helper_name_ok(store):
            out.store = store
        elif store:
            log.warning("ignoring 'credsStore' in auth file %s: not a helper name", f.path)
    if not isinstance(auths, dict):
        log.warning("ignoring auth file %s: 'auths' is not a JSON object", f.path)
        return out
    seen: dict[str, tuple[dict, bool]] = {}
    for key, entry in auths.items():
        if not isinstance(key, str) or not isinstance(entry, dict):
            continue
        norm, legacy = _normalize_key(key)
        # The form Podman writes (no scheme) beats a legacy URL for the same registry.
        if norm not in seen or (seen[norm][1] and not legacy):
            seen[norm] = (entry, legacy)
    out.entries = {k: v[0] for k, v in seen.items()}
    return out


def _helper_name_ok(name: str) -> bool:
    """A helper name becomes part of a program name: no paths, no options."""
    return bool(name) and "/" not in name and not name.startswith("-") and len(name) < 128
