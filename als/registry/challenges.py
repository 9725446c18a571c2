"""Registry credentials from Podman's auth files, and the 401 challenge flow.

Podman before 5.1 never hands its credentials to an Additional Layer Store
(and 5.1+ only through a helper, als/ops/authhelper.py), so the store looks where
``podman login`` and ``docker login`` leave them, in the order
containers/image reads them, and then speaks the registry's own challenge
protocol (Basic, or the Docker token service) with them. Which sources are
asked, in which order, is keychain.py's business; this module reads one
list of auth files.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import requests

from ..errors import AuthError, RegistryError

log = logging.getLogger("als.registry")

DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = {"index.docker.io", "registry-1.docker.io", "docker.io"}
DEFAULT_TOKEN_TTL = 60.0
CLIENT_ID = "als"


class TransientError(RegistryError):
    """A failure worth retrying: connection trouble, timeouts, 5xx, 429.

    ``retry_after`` carries the server's Retry-After hint in seconds, if any.
    """

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


# --------------------------------------------------------------------------
# Credentials in auth files
# --------------------------------------------------------------------------

@dataclass
class Credentials:
    """A username/password pair or an identity (refresh) token for one registry."""

    username: str
    password: str
    identity_token: str = ""

    def __repr__(self) -> str:
        secret = "identity_token=***" if self.identity_token else "password=***"
        return f"Credentials(username={self.username!r}, {secret})"

    __str__ = __repr__

    def describe(self) -> str:
        """Who we are, in words fit for a log line or an error message."""
        if self.username:
            return f"user {self.username!r}"
        return "an identity token" if self.identity_token else "empty credentials"


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


def normalize_registry(host: str) -> str:
    """The auth-file spelling of a registry host: Docker Hub's many names become docker.io."""
    host = host.strip().rstrip("/")
    return DOCKER_HUB if host.lower() in _DOCKER_HUB_ALIASES else host


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
                creds = _decode_entry(content.entries[key], f.path, key)
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
    from .credhelper import HelperError, helper_get
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


def _decode_entry(entry: dict, path: Path, key: str, plain: bool = False) -> Credentials | None:
    """The credentials of one ``auths`` entry, or None (logged when malformed).

    ``plain`` also accepts separate ``username``/``password`` fields, which
    the kubelet's config.json may carry; containers/image reads only ``auth``.
    """
    auth = entry.get("auth") or ""
    token = entry.get("identitytoken") or ""
    if not isinstance(auth, str) or not isinstance(token, str):
        log.warning("ignoring entry %r in auth file %s: malformed", key, path)
        return None
    if plain and not auth and not token:
        user, pw = entry.get("username") or "", entry.get("password") or ""
        if isinstance(user, str) and isinstance(pw, str) and user:
            return Credentials(username=user, password=pw)
    username = password = ""
    if auth:
        try:
            decoded = base64.b64decode(auth.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            log.warning("ignoring entry %r in auth file %s: 'auth' is not base64 'user:password'",
                        key, path)
            return None
        username, sep, password = decoded.partition(":")
        if not sep:
            log.warning("ignoring entry %r in auth file %s: 'auth' is not base64 'user:password'",
                        key, path)
            return None
    if not auth and not token:
        return None
    return Credentials(username=username, password=password, identity_token=token)


# --------------------------------------------------------------------------
# WWW-Authenticate challenges
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Challenge:
    """One challenge of a WWW-Authenticate header; ``scheme`` is lowercase."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` (RFC 7235), which may carry several challenges."""
    out: list[Challenge] = []
    i, n = 0, len(header)

    def skip(chars: str) -> None:
        nonlocal i
        while i < n and header[i] in chars:
            i += 1

    def token() -> str:
        nonlocal i
        start = i
        while i < n and header[i] not in ' \t,="':
            i += 1
        return header[start:i]

    while i < n:
        skip(" \t,")
        scheme = token()
        if not scheme:
            break
        params: dict[str, str] = {}
        while True:
            skip(" \t")
            save = i
            name = token()
            skip(" \t")
            if not name or i >= n or header[i] != "=":
                i = save  # not a parameter: the next challenge starts here
                break
            i += 1
            skip(" \t")
            if i < n and header[i] == '"':
                i += 1
                buf = []
                while i < n and header[i] != '"':
                    if header[i] == "\\" and i + 1 < n:
                        i += 1
                    buf.append(header[i])
                    i += 1
                i += 1  # closing quote
                value = "".join(buf)
            else:
                value = token()
            params[name.lower()] = value
            skip(" \t")
            if i < n and header[i] == ",":
                i += 1
                continue
            break
        out.append(Challenge(scheme=scheme.lower(), params=params))
    return out


# --------------------------------------------------------------------------
# Answering challenges, with a token cache
# --------------------------------------------------------------------------

@dataclass
class _Token:
    value: str
    expires: float  # time.monotonic() after which we fetch a new one


@dataclass(frozen=True)
class _Hint:
    """What worked last time for (host, repository, actions): send it up front."""

    scheme: str  # "basic" or "bearer"
    realm: str = ""
    service: str = ""
    scope: str = ""
    insecure: bool = False
    basic: str = field(default="", repr=False)  # the Basic header value, for scheme "basic"


CredentialLookup = Callable[[str, str], "Credentials | None"]


class Authenticator:
    """Turns 401 challenges into Authorization headers and caches bearer tokens.

    Tokens are cached per (realm, service, scope) until ``expires_in`` minus a
    margin; the last working challenge per (host, repository, actions) is
    remembered so later requests carry the header without a 401 round trip.
    Thread-safe: one token fetch per cache key at a time.
    """

    def __init__(self, session: requests.Session, credentials: CredentialLookup,
                 timeout: tuple[float, float] = (10.0, 30.0), user_agent: str = "als"):
        self._session = session
        self._credentials = credentials
        self._timeout = timeout
        self._user_agent = user_agent
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        self._fetching: dict[tuple[str, str, str], threading.Lock] = {}
        self._hints: dict[tuple[str, str, str], _Hint] = {}
        self.token_fetches = 0  # how many times a token service was asked (for tests/metrics)

    # -- used by the client -------------------------------------------------
    def header_for(self, host: str, repository: str, actions: str) -> str | None:
        """The Authorization value to send up front, or None (let the registry challenge)."""
        with self._lock:
            hint = self._hints.get((host, repository, actions))
        if hint is None:
            return None
        if hint.scheme == "basic":
            return hint.basic or None
        # Known realm: an expired token is fetched again without waiting for a 401.
        return f"Bearer {self._token(hint, host, repository)}"

    def answer(self, host: str, repository: str, actions: str, header: str,
               insecure: bool, stale: str | None = None) -> str:
        """The Authorization value to retry with after a 401 carrying ``header``.

        ``stale`` is the Authorization value the 401 answered; a cached token
        equal to it is dropped first. Raises AuthError if we cannot answer.
        """
        challenges = {c.scheme: c for c in parse_challenges(header or "")}
        if "bearer" in challenges and challenges["bearer"].params.get("realm"):
            c = challenges["bearer"]
            scope = c.params.get("scope") or f"repository:{repository}:{actions}"
            hint = _Hint("bearer", c.params["realm"], c.params.get("service", ""), scope, insecure)
            with self._lock:
                old = self._hints.get((host, repository, actions))
            # A token refused for the scope it was issued for is dead; one refused
            # because the request needs a wider scope stays good for its own scope.
            if stale and (old is None or (old.realm, old.service, old.scope) ==
                          (hint.realm, hint.service, hint.scope)):
                self._drop_token((hint.realm, hint.service, hint.scope), stale)
            token = self._token(hint, host, repository)
            with self._lock:
                self._hints[(host, repository, actions)] = hint
            return f"Bearer {token}"
        if stale:
            self.forget(host, repository, actions, stale)
        if "basic" in challenges:
            creds = self._credentials(host, repository)
            if creds is None or not creds.username:
                raise AuthError(f"registry {host} requires a login for repository {repository} "
                                "and no credentials for it were found (auth files, credential "
                                "helpers, als auth-helper)")
            header = _basic(creds)
            with self._lock:
                self._hints[(host, repository, actions)] = _Hint("basic", basic=header)
            return header
        raise AuthError(f"registry {host} refused access to repository {repository} with an "
                        f"authentication challenge als does not support ({header!r:.80})")

    def forget(self, host: str, repository: str, actions: str, stale: str | None = None) -> None:
        """Drop the cached token (if ``stale`` is it) so the next request fetches a new one."""
        with self._lock:
            hint = self._hints.get((host, repository, actions))
            if hint is not None and hint.scheme == "bearer":
                key = (hint.realm, hint.service, hint.scope)
                tok = self._tokens.get(key)
                if tok is not None and (stale is None or stale == f"Bearer {tok.value}"):
                    del self._tokens[key]
            elif hint is not None and (stale is None or stale == hint.basic):
                del self._hints[(host, repository, actions)]

    def _drop_token(self, key: tuple[str, str, str], stale: str) -> None:
        with self._lock:
            tok = self._tokens.get(key)
            if tok is not None and stale == f"Bearer {tok.value}":
                del self._tokens[key]

    # -- token service --------------------------------------------------------
    def _token(self, hint: _Hint, host: str, repository: str) -> str:
        """The cached token for ``hint``, or a freshly fetched one (one fetch per key at a time)."""
        key = (hint.realm, hint.service, hint.scope)
        with self._lock:
            tok = self._tokens.get(key)
            if tok and tok.expires > time.monotonic():
                return tok.value
            lock = self._fetching.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                tok = self._tokens.get(key)
                if tok and tok.expires > time.monotonic():
                    return tok.value
            value, ttl = self._fetch_token(hint, host, repository)
            margin = min(30.0, ttl * 0.2)
            with self._lock:
                self._tokens[key] = _Token(value, time.monotonic() + max(0.0, ttl - margin))
            return value

    def _fetch_token(self, hint: _Hint, host: str, repository: str) -> tuple[str, float]:
        realm = urlsplit(hint.realm)
        if realm.scheme not in ("https", "http") or not realm.netloc:
            raise RegistryError(f"registry {host} names an invalid token service realm {hint.realm!r}")
        creds = self._credentials(host, repository)
        if creds is not None and realm.scheme == "http" and not hint.insecure:
            raise AuthError(f"registry {host} sends us to a plain-HTTP token service "
                            f"({realm.netloc}); refusing to send credentials there unless the "
                            "registry is marked insecure in registries.conf")
        who = creds.describe() if creds else "anonymous (no credentials found)"
        params = {"scope": hint.scope}
        if hint.service:
            params["service"] = hint.service
        headers = {"User-Agent": self._user_agent}
        kwargs = dict(timeout=self._timeout, verify=not hint.insecure, headers=headers,
                      allow_redirects=True)
        with self._lock:
            self.token_fetches += 1
        log.debug("asking token service %s for %s as %s", realm.netloc, hint.scope, who)
        try:
            if creds is not None and creds.identity_token:
                form = dict(params, grant_type="refresh_token", refresh_token=creds.identity_token,
                            client_id=CLIENT_ID)
                resp = self._session.post(hint.realm, data=form, **kwargs)
            else:
                if creds is not None and creds.username:
                    params["account"] = creds.username
                params["client_id"] = CLIENT_ID
                auth = (creds.username, creds.password) if creds and creds.username else None
                resp = self._session.get(hint.realm, params=params, auth=auth, **kwargs)
        except requests.RequestException as exc:
            raise TransientError(f"token service {realm.netloc} for registry {host} is "
                                 f"unreachable: {type(exc).__name__}") from None
        with resp:
            status = resp.status_code
            if status in (401, 403):
                raise AuthError(f"token service {realm.netloc} for registry {host} refused "
                                f"{who} for {hint.scope} (HTTP {status})")
            if status == 429 or status >= 500:
                raise TransientError(f"token service {realm.netloc} for registry {host} "
                                     f"answered HTTP {status}")
            if status != 200:
                raise RegistryError(f"token service {realm.netloc} for registry {host} "
                                    f"answered HTTP {status} for {hint.scope}")
            try:
                body = resp.json()
            except ValueError:
                body = None
        if not isinstance(body, dict):
            raise RegistryError(f"token service {realm.netloc} answered something that is not JSON")
        value = body.get("token") or body.get("access_token")
        if not isinstance(value, str) or not value:
            raise RegistryError(f"token service {realm.netloc} answered without a token")
        ttl = body.get("expires_in")
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0:
            ttl = DEFAULT_TOKEN_TTL
        return value, float(ttl)


def _basic(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode("utf-8")
    return "Basic " + base64.b64encode(raw).decode("ascii")
