"""Answering a registry's 401: WWW-Authenticate challenges, Basic, and bearer tokens.

A registry names its own way of letting us in: Basic with the credentials
the keychain found, or the Docker token service, whose tokens we fetch and
cache so that thousands of lazy range reads cost one token request, not one
each. Where the credentials come from is credentials/'s business.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests

from ..errors import AuthError, RegistryError, TransientError
from .credentials.entries import CredentialLookup, Credentials

log = logging.getLogger("als.registry")

DEFAULT_TOKEN_TTL = 60.0
CLIENT_ID = "als"


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
