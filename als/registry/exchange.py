"""One HTTP exchange with a registry: send, answer its challenge, classify the outcome.

Pulls and pushes both need the same care around each request: connections
pooled and shared by all threads, the 401 answered once through the
Authenticator, an insecure registry probed over HTTPS and plain HTTP at once
(HTTPS wins when it works),
blob reads sent straight to the storage URL a registry redirected to, TLS
failures explained with what the operator can do, 5xx/429 and dropped
connections turned into a TransientError for the retry policy, and no URL
query (signatures, upload state) in a log line.
"""

from __future__ import annotations

import logging
import threading
import warnings
from contextlib import nullcontext
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, TypeVar
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from ..errors import AuthError, ConfigError, RegistryError, TransientError
from .challenges import Authenticator
from .credentials.entries import CredentialLookup
from .deadline import current_deadline, request_deadline
from .deadline import install as watch_deadlines
from .diagnosis import redact_url, tls_is_definitive, tls_wants_client_cert, why
from .redirects import BlobLocations
from .responses import Operation, release
from .retry import retry_after
from .sysregistries import Endpoint
from .tls import TLSAdapter, TLSContexts

log = logging.getLogger("als.registry")

T = TypeVar("T")


class Body:
    """A request body that can be sent again (after a 401 or a retry)."""

    def __init__(self, data: bytes | BinaryIO):
        self._data = data
        self._pos: int | None = None
        self._sent = False
        if not isinstance(data, bytes):
            try:
                self._pos = data.tell()
            except (OSError, AttributeError):
                self._pos = None

    def rewound(self) -> bytes | BinaryIO:
        if isinstance(self._data, bytes):
            return self._data
        if self._sent:
            if self._pos is None:
                raise RegistryError("cannot send a non-seekable upload body twice")
            self._data.seek(self._pos)
        self._sent = True
        return self._data


class Exchange:
    """The HTTP side shared by pull and push: one session, its auth, its TLS, its memory.

    Remembers per host which scheme worked (``schemes``) and per blob where
    the registry redirected us (``locations``). Thread-safe.
    """

    def __init__(self, credentials: CredentialLookup, tls: TLSContexts, *,
                 timeout: tuple[float, float], pool_size: int, user_agent: str) -> None:
        self.timeout = timeout
        self.tls = tls
        self.locations = BlobLocations()
        self.session = requests.Session()
        size = max(16, pool_size)
        self.session.mount("https://", TLSAdapter(tls, pool_connections=size, pool_maxsize=size,
                                                  max_retries=0, pool_block=False))
        self.session.mount("http://", HTTPAdapter(pool_connections=size, pool_maxsize=size,
                                                  max_retries=0, pool_block=False))
        self.session.headers["User-Agent"] = user_agent
        watch_deadlines(self.session)  # a wall-clock bound on waiting for each answer's head
        self.auth = Authenticator(self.session, credentials, timeout, user_agent)
        self._credentials = credentials
        self._lock = threading.Lock()
        self.schemes: dict[str, str] = {}  # host -> scheme that worked
        self._warned_insecure: set[str] = set()

    def close(self) -> None:
        self.session.close()

    def attempt(self, ep: Endpoint, repo: str, op: Operation, method: str, target: str,
                headers: dict[str, str], consume: Callable[[requests.Response, Endpoint], T],
                keep_open: bool = False) -> T:
        """One request and ``consume`` of its response; a body broken off is transient.

        The response is released afterwards unless ``keep_open`` and ``consume`` succeeded.
        """
        if method == "GET" and "/blobs/" in target:
            resp = self._blob_request(ep, repo, op, target, headers)
        else:
            resp = self.request(ep, repo, op, method, target, headers)
        ok = False
        try:
            result = consume(resp, ep)
            ok = True
            return result
        except requests.RequestException as exc:
            raise TransientError(f"registry {ep.host} broke off {op.what} of image {op.ref}: "
                                 f"{why(exc)}") from None
        finally:
            if not (ok and keep_open):
                release(resp)

    def _blob_request(self, ep: Endpoint, repo: str, op: Operation, target: str,
                      headers: dict[str, str]) -> requests.Response:
        """A blob GET: straight to the storage URL the registry redirected us to last time,
        if we have one that still works, else through the registry (remembering a redirect)."""
        url = self.locations.get(ep.host, target)
        if url is not None:
            try:
                resp = self._send_authed(ep, repo, op, "GET", url, headers, None)
            except (requests.RequestException, AuthError) as exc:
                cause = why(exc) if isinstance(exc, requests.RequestException) else "refused"
            else:
                if resp.status_code in (200, 206):
                    return resp
                cause = f"HTTP {resp.status_code}"
                release(resp)
            self.locations.forget(ep.host, target, url)
            log.info("registry %s: the storage URL it gave for blob %s of image %s no longer "
                     "works (%s); asking the registry again", ep.host, target.rsplit("/", 1)[-1],
                     op.ref, cause)
        resp = self.request(ep, repo, op, "GET", target, headers)
        if resp.history and resp.status_code in (200, 206) and resp.url:
            self.locations.remember(ep.host, target, resp.url)
            log.debug("registry %s redirects blob %s to %s", ep.host, target.rsplit("/", 1)[-1],
                      redact_url(resp.url))
        return resp

    def scheme(self, ep: Endpoint) -> str:
        """The scheme that worked for ``ep`` (https until a probe found otherwise)."""
        with self._lock:
            return self.schemes.get(ep.host, "https")

    def request(self, ep: Endpoint, repo: str, op: Operation, method: str, target: str,
                headers: dict[str, str], body: Body | None = None) -> requests.Response:
        """Send one request (https, then http if insecure), answering a 401 once.

        ``target`` is a path on ``ep`` or a whole URL. Returns any response
        but 5xx/429 and 401, which raise.
        """
        if target.startswith("/"):
            with self._lock:
                known = self.schemes.get(ep.host)
            schemes = [known] if known else (["https", "http"] if ep.insecure else ["https"])
            urls = [f"{s}://{ep.host}{target}" for s in schemes]
        else:
            urls = [target]
        # An insecure registry not yet spoken to: ask over plain HTTP while HTTPS is tried, so a
        # registry that serves only HTTP costs no probe's round trips first (see _plain_leg).
        plain = (self._plain_leg(ep, method, urls[1], headers)
                 if len(urls) > 1 and body is None and method in ("GET", "HEAD") else None)
        try:
            return self._first_working(ep, repo, op, method, target, urls, headers, body, plain)
        finally:
            if plain is not None and not plain.taken:
                plain.answer.add_done_callback(_discard)  # HTTPS answered (or failed for good): not used

    def _first_working(self, ep: Endpoint, repo: str, op: Operation, method: str, target: str,
                       urls: list[str], headers: dict[str, str], body: Body | None,
                       plain: "_PlainLeg | None") -> requests.Response:
        """The answer from the first of ``urls`` that can be reached (``plain``: the second's, under way)."""
        for n, url in enumerate(urls):
            try:
                if plain is not None and n == 1:
                    resp = self._send_authed(ep, repo, op, method, url, headers, body, first=plain)
                else:
                    resp = self._send_authed(ep, repo, op, method, url, headers, body)
            except requests.Timeout:
                raise TransientError(f"registry {ep.host} timed out on {op.what} of image "
                                     f"{op.ref}") from None
            except requests.exceptions.SSLError as exc:
                if n + 1 < len(urls):
                    log.info("registry %s: HTTPS failed (%s); trying plain HTTP, as it is marked "
                             "insecure", ep.host, why(exc))
                    continue
                if not tls_is_definitive(exc):  # e.g. a connection reset mid-handshake
                    raise TransientError(f"TLS with registry {ep.host} failed for {op.what} of "
                                         f"image {op.ref} ({why(exc)})") from None
                raise RegistryError(f"TLS with registry {ep.host} failed for {op.what} of image "
                                    f"{op.ref} ({why(exc)}); {self._tls_hint(ep, exc)}") from None
            except requests.ConnectionError as exc:
                if n + 1 < len(urls):
                    log.info("registry %s: HTTPS failed (%s); trying plain HTTP, as it is marked "
                             "insecure", ep.host, why(exc))
                    continue
                raise TransientError(f"registry {ep.host} is unreachable for {op.what} of image "
                                     f"{op.ref} ({why(exc)})") from None
            except requests.RequestException as exc:
                raise RegistryError(f"request to registry {ep.host} for {op.what} of image "
                                    f"{op.ref} failed: {why(exc)}") from None
            if target.startswith("/") and len(urls) > 1:
                with self._lock:
                    self.schemes[ep.host] = urlsplit(url).scheme
            status = resp.status_code
            if status == 429 or status >= 500:
                hint = retry_after(resp.headers.get("Retry-After"))
                release(resp)
                raise TransientError(f"registry {ep.host} answered {status} for {op.what} of "
                                     f"image {op.ref}", hint)
            return resp
        raise AssertionError("unreachable")

    def _plain_leg(self, ep: Endpoint, method: str, url: str, headers: dict[str, str]) -> "_PlainLeg":
        """Send ``method url`` (plain HTTP) on a thread of its own; its answer to come.

        It carries no Authorization: it may reach the network before HTTPS is
        found to work, and credentials go over plain HTTP only once HTTPS has
        failed (a 401 it gets is answered then, as the sequential probe would).
        It keeps the caller's request deadline.
        """
        leg = _PlainLeg()
        deadline = current_deadline()

        def run() -> None:
            try:
                with request_deadline(deadline) if deadline is not None else nullcontext():
                    leg.answer.set_result(self._send(ep, method, url, headers, None, None))
            except BaseException as exc:  # handed to whoever takes the answer
                leg.answer.set_exception(exc)

        threading.Thread(target=run, name="als-http-probe", daemon=True).start()
        return leg

    def _send_authed(self, ep: Endpoint, repo: str, op: Operation, method: str, url: str,
                     headers: dict[str, str], body: Body | None,
                     first: "_PlainLeg | None" = None) -> requests.Response:
        """Send with the credentials we know of, answering a 401 once.

        ``first``: the anonymous answer to the same request, already under way (_plain_leg).
        """
        same_host = urlsplit(url).netloc == ep.host
        if first is not None:
            auth = None
            first.taken = True
            resp = first.answer.result()
        else:
            auth = self.auth.header_for(ep.host, repo, op.actions) if same_host else None
            resp = self._send(ep, method, url, headers, body, auth)
        if resp.status_code != 401 or not same_host:
            return resp
        www = resp.headers.get("WWW-Authenticate", "")
        release(resp)
        auth = self.auth.answer(ep.host, repo, op.actions, www, ep.insecure, stale=auth)
        resp = self._send(ep, method, url, headers, body, auth)
        if resp.status_code == 401:
            release(resp)
            self.auth.forget(ep.host, repo, op.actions, auth)
            creds = self._credentials(ep.host, repo)
            who = creds.describe() if creds else "anonymous access (no credentials found)"
            raise AuthError(f"registry {ep.host} refused {who} for {op.what} of image {op.ref}")
        return resp

    def _send(self, ep: Endpoint, method: str, url: str, headers: dict[str, str],
              body: Body | None, auth: str | None) -> requests.Response:
        h = dict(headers)
        if auth:
            h["Authorization"] = auth
        verify = not ep.insecure
        if not verify and url.startswith("https:"):
            self._note_insecure(ep.host)
        log.debug("%s %s", method, redact_url(url))
        try:
            return self.session.request(method, url, headers=h,
                                        data=body.rewound() if body is not None else None,
                                        stream=True, timeout=self.timeout, verify=verify,
                                        allow_redirects=True)
        except ConfigError as exc:  # a broken certs.d directory: nothing to retry
            raise RegistryError(f"registry {ep.host}: {exc}") from None

    def _tls_hint(self, ep: Endpoint, exc: BaseException) -> str:
        """What the operator can do about a TLS failure, naming our certs.d directories."""
        where = self.tls.describe(ep.host)
        if tls_wants_client_cert(exc):
            if self.tls.client_cert(ep.host) is None:
                return (f"it asks for a client certificate: put client.cert and client.key in "
                        f"{where}")
            return "it refused our client certificate"
        return (f"if it uses a private CA, put the CA certificate (*.crt) in {where}; if it "
                "serves plain HTTP or a self-signed certificate, mark it insecure in "
                "registries.conf")

    def _note_insecure(self, host: str) -> None:
        with self._lock:
            if host in self._warned_insecure:
                return
            self._warned_insecure.add(host)
        log.info("registry %s is marked insecure in registries.conf: not verifying its TLS "
                 "certificate", host)
        from urllib3.exceptions import InsecureRequestWarning
        warnings.filterwarnings("ignore", category=InsecureRequestWarning)


@dataclass
class _PlainLeg:
    """The plain HTTP half of an insecure registry's first exchange (Exchange._plain_leg)."""

    answer: Future = field(default_factory=Future)  # -> requests.Response
    taken: bool = False  # the HTTPS half failed and this answer was used


def _discard(fut: Future) -> None:
    """Close an answer nobody will read (its connection goes back to the pool if it can)."""
    if fut.exception() is None:
        release(fut.result())
