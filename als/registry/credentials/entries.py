"""Credentials, and the auth-file entry they are written as.

Every credential source (auth files, CRI-O's global auth file, the kubelet's
config, credential helpers, the auth helper) ends in the same
:class:`Credentials` and keys them by the same registry spelling, and two of
them store entries in the same ``auths`` format. Kept apart from the sources
so that each can use it without importing another.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger("als.registry")

DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = {"index.docker.io", "registry-1.docker.io", "docker.io"}


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


CredentialLookup = Callable[[str, str], "Credentials | None"]  # (host, repository) -> creds


def normalize_registry(host: str) -> str:
    """The auth-file spelling of a registry host: Docker Hub's many names become docker.io."""
    host = host.strip().rstrip("/")
    return DOCKER_HUB if host.lower() in _DOCKER_HUB_ALIASES else host


def decode_entry(entry: dict, path: Path, key: str, plain: bool = False) -> Credentials | None:
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
