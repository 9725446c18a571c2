"""Docker credential helpers: ``docker-credential-<name> get``.

``podman login`` and ``docker login`` can leave a credential in a helper
(``credHelpers`` / ``credsStore`` in an auth file, ``credential-helpers`` in
registries.conf) rather than in the file itself. The protocol is the one of
docker/docker-credential-helpers: the registry host on stdin, a JSON object
``{"ServerURL", "Username", "Secret"}`` on stdout, and the exact message
"credentials not found in native keychain" when there is none. A username
of ``<token>`` means the secret is an identity (refresh) token.

A helper is an arbitrary program, so each call is bounded in time and its
answers are cached briefly: a FUSE read storm must not fork a process per
request, and a hung helper must not hang a pull.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from dataclasses import dataclass

from .entries import Credentials

log = logging.getLogger("als.registry")

NOT_FOUND = "credentials not found in native keychain"
TOKEN_USERNAME = "<token>"
MAX_OUTPUT = 64 * 1024


class HelperError(Exception):
    """The helper ran but failed (not "not found"); the message holds no secret."""


def program(name: str) -> str:
    """The executable a helper name stands for, as Docker and containers/image spell it."""
    return f"docker-credential-{name}"


def helper_get(name: str, server: str, timeout: float = 10.0) -> Credentials | None:
    """Ask helper ``name`` for ``server``'s credentials; None when it has none.

    Raises HelperError when the helper is missing, times out, fails or
    answers something that is not the protocol's JSON.
    """
    argv = [program(name), "get"]
    try:
        proc = subprocess.run(argv, input=server.encode("utf-8"), capture_output=True,
                              timeout=timeout, check=False)
    except FileNotFoundError:
        raise HelperError(f"credential helper {argv[0]} is not installed (not on PATH)") from None
    except subprocess.TimeoutExpired:
        raise HelperError(f"credential helper {argv[0]} did not answer for {server} within "
                          f"{timeout:g}s") from None
    except OSError as exc:
        raise HelperError(f"cannot run credential helper {argv[0]}: {exc.strerror}") from None
    out = proc.stdout[:MAX_OUTPUT].decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        if out == NOT_FOUND:
            return None
        # By the protocol a failing helper prints its error message on stdout;
        # only its first line is kept, short, in case a broken helper says more.
        first = out.splitlines()[0][:120] if out else f"exit status {proc.returncode}"
        raise HelperError(f"credential helper {argv[0]} failed for {server}: {first}")
    try:
        doc = json.loads(out)
    except ValueError:
        raise HelperError(f"credential helper {argv[0]} answered {server} with something "
                          "that is not JSON") from None
    if not isinstance(doc, dict):
        raise HelperError(f"credential helper {argv[0]} answered {server} with something "
                          "that is not a JSON object")
    username, secret = doc.get("Username", ""), doc.get("Secret", "")
    if not isinstance(username, str) or not isinstance(secret, str):
        raise HelperError(f"credential helper {argv[0]} answered {server} with a malformed "
                          "Username or Secret")
    if not secret:
        return None
    if username == TOKEN_USERNAME:
        return Credentials(username="", password="", identity_token=secret)
    return Credentials(username=username, password=secret)


@dataclass
class _Answer:
    creds: Credentials | None
    until: float


class HelperCache:
    """Calls helpers through :func:`helper_get`, remembering answers for ``ttl`` seconds.

    Failures are remembered too (as "none"), so a broken helper costs one
    process and one warning per ``ttl``, not one per request. One call per
    (helper, server) runs at a time; concurrent askers wait for it.
    """

    def __init__(self, timeout: float = 10.0, ttl: float = 10.0):
        self.timeout = timeout
        self.ttl = ttl
        self.calls = 0  # helper processes started, for tests
        self._lock = threading.Lock()
        self._answers: dict[tuple[str, str], _Answer] = {}
        self._running: dict[tuple[str, str], threading.Lock] = {}

    def get(self, name: str, server: str) -> Credentials | None:
        key = (name, server)
        with self._lock:
            ans = self._answers.get(key)
            if ans is not None and ans.until > time.monotonic():
                return ans.creds
            running = self._running.setdefault(key, threading.Lock())
        with running:
            with self._lock:
                ans = self._answers.get(key)
                if ans is not None and ans.until > time.monotonic():
                    return ans.creds
                self.calls += 1
            try:
                creds = helper_get(name, server, self.timeout)
            except HelperError as exc:
                log.warning("%s; going on without it", exc)
                creds = None
            else:
                log.debug("credential helper %s has %s for %s", program(name),
                          creds.describe() if creds else "no credentials", server)
            with self._lock:
                self._answers[key] = _Answer(creds, time.monotonic() + self.ttl)
                if len(self._answers) > 1024:  # bounded: drop the stalest
                    oldest = min(self._answers, key=lambda k: self._answers[k].until)
                    del self._answers[oldest]
            return creds

    def clear(self) -> None:
        with self._lock:
            self._answers.clear()
