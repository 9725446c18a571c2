"""Where the store finds registry credentials, in one documented order.

The store serves Podman and CRI-O, and neither hands it credentials on every
request, so it looks where they keep them (README, "Registries and
credentials"), first match wins:

1. credentials the engine pushed with ``als auth-helper`` (Podman >= 5.1's
   ``additional-layer-store-auth-helper``) for this very repository;
2. CRI-O's ``global_auth_file``, when ``registry.global_auth_file`` names it;
3. registries.conf ``credential-helpers``, in order; the default
   ``containers-auth.json`` means Podman's auth files (authfiles.py), with their
   ``credHelpers``/``credsStore``;
4. the kubelet's ``config.json`` (``registry.kubelet_config``), with its
   glob keys (``*.example.com``);
5. credentials pushed by ``als auth-helper`` for another repository of the
   same registry.

Pushed credentials live in this process's memory only: they are never
written to disk, logged, or returned by the control socket.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from .authfiles import AuthFile, default_auth_files, find_credentials
from .credhelper import HelperCache
from .entries import Credentials, normalize_registry
from .kubelet import kubelet_credentials
from .pushed import PushedCredentials

log = logging.getLogger("als.registry")

AUTH_FILES_HELPER = "containers-auth.json"  # registries.conf's name for "the auth files"


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
