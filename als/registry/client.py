"""The HTTP side of the store: manifests, blobs and byte ranges from registries.

Lazy pulling turns one image pull into thousands of small range requests made
from FUSE threads, so this client keeps connections alive, shares them across
threads, bounds every wait (timeouts, retry counts, a retry deadline) so a
file read fails instead of hanging, and follows registries.conf (mirrors,
rewrites, insecure, blocked) exactly as Podman would for the same image.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import ssl
import threading
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import BinaryIO, Callable, Iterator, TypeVar
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from .. import __version__
from ..errors import AuthError, ConfigError, NotFoundError, RegistryError, VerificationError
from ..oci import MANIFEST_TYPES
from ..reference import Reference
from .auth import Authenticator, CredentialLookup, TransientError
from .keychain import Keychain
from .redirects import BlobLocations
from .deadline import install as watch_deadlines
from .deadline import request_deadline
from .sysregistries import Endpoint, RegistriesConf
from .tls import TLSAdapter, TLSContexts

log = logging.getLogger("als.registry")

MAX_MANIFEST_SIZE = 4 * 1024 * 1024  # the limit containers/image applies too

_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_CHUNK = 64 * 1024
_PREFERENCE_TTL = 300.0  # how long a working mirror stays first in line

T = TypeVar("T")


@dataclass
class Manifest:
    """A manifest or index exactly as the registry sent it, with its verified digest."""

    data: bytes
    media_type: str
    digest: str


@dataclass
class _Request:
    """What we are doing, for messages: ``what`` names the object, ``ref`` the image."""

    ref: Reference
    what: str
    actions: str = "pull"


class RegistryClient:
    """Talks the OCI distribution API to the hosts registries.conf designates.

    One instance is shared by all threads of the store. Every public method
    raises a RegistryError subclass (or VerificationError for bad content)
    whose message names the image and the object; none ever carries a secret.
    """

    def __init__(self, conf: RegistriesConf | None = None, *,
                 credentials: CredentialLookup | None = None,
                 connect_timeout: float = 10.0, read_timeout: float = 30.0,
                 retries: int = 3, backoff: float = 0.2, max_backoff: float = 5.0,
                 retry_deadline: float = 60.0, pool_size: int = 16,
                 certs_dir: str | None = None,
                 user_agent: str = f"als/{__version__}") -> None:
        """``credentials`` defaults to a :class:`Keychain` with registries.conf's
        credential-helpers; ``certs_dir`` replaces Podman's certs.d directories."""
        self.conf = conf if conf is not None else RegistriesConf.load()
        self.timeout = (connect_timeout, read_timeout)
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.retry_deadline = retry_deadline
        self.user_agent = user_agent
        if credentials is None:
            credentials = Keychain(helpers=self.conf.credential_helpers)
        self._credentials = credentials
        self.keychain = credentials if isinstance(credentials, Keychain) else None
        self.tls = TLSContexts(certs_dir)
        self.locations = BlobLocations()
        self.session = requests.Session()
        size = max(16, pool_size)
        self.session.mount("https://", TLSAdapter(self.tls, pool_connections=size, pool_maxsize=size,
                                                  max_retries=0, pool_block=False))
        self.session.mount("http://", HTTPAdapter(pool_connections=size, pool_maxsize=size,
                                                  max_retries=0, pool_block=False))
        self.session.headers["User-Agent"] = user_agent
        watch_deadlines(self.session)  # a wall-clock bound on waiting for each answer's head
        self.auth = Authenticator(self.session, credentials, self.timeout, user_agent)
        self._lock = threading.Lock()
        self._schemes: dict[str, str] = {}  # host -> scheme that worked
        # image (registry, repository) -> ((host, repository) that worked, when)
        self._preferred: dict[tuple[str, str], tuple[tuple[str, str], float]] = {}
        self._warned_insecure: set[str] = set()

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ pull
    def get_manifest(self, ref: Reference, reference: str | None = None) -> Manifest:
        """Fetch a manifest or index by tag or digest (default: the ref's digest, else tag).

        Fetched by digest, the bytes are verified against it; by tag, the
        digest is computed from the bytes (never taken from a header).
        """
        reference = reference or ref.reference
        by_digest = ":" in reference
        if by_digest:
            _check_digest(reference)
        req = _Request(ref, f"manifest {reference}")
        headers = {"Accept": ", ".join(MANIFEST_TYPES)}

        def consume(resp: requests.Response, ep: Endpoint) -> Manifest:
            self._expect(resp, (200,), req, ep)
            data = _read_limited(resp, MAX_MANIFEST_SIZE, req, ep)
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            if media_type not in MANIFEST_TYPES:
                media_type = _media_type_from_json(data) or media_type
            if by_digest:
                _verify(data, reference, req, ep)
                digest = reference
            else:
                digest = "sha256:" + hashlib.sha256(data).hexdigest()
            return Manifest(data=data, media_type=media_type, digest=digest)

        return self._pull(req, "GET", f"manifests/{reference}", consume, headers)

    def get_blob(self, ref: Reference, digest: str, max_size: int) -> bytes:
        """A whole small blob (a config), verified; refuses blobs larger than ``max_size``."""
        _check_digest(digest)
        req = _Request(ref, f"blob {digest}")

        def consume(resp: requests.Response, ep: Endpoint) -> bytes:
            self._expect(resp, (200,), req, ep)
            data = _read_limited(resp, max_size, req, ep)
            _verify(data, digest, req, ep)
            return data

        return self._pull(req, "GET", f"blobs/{digest}", consume)

    def read_range(self, ref: Reference, digest: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a blob, exactly, or a RegistryError.

        Asks for ``Range: bytes=start-(end-1)``; a registry that ignores it
        (200) is read only up to ``end`` and the connection dropped.
        """
        out = bytearray()
        self.stream_range(ref, digest, start, end, out.extend)
        return bytes(out)

    def stream_range(self, ref: Reference, digest: str, start: int, end: int,
                     sink: Callable[[bytes], None]) -> int:
        """Hand bytes [start, end) of a blob to ``sink`` in order, as they arrive; returns their count.

        For readers that consume a range piece by piece (the chunk fetcher
        decodes each chunk as soon as its bytes are in), so that a large range
        is never held whole in memory. Each byte reaches ``sink`` exactly once:
        a retry after a broken body skips what was already handed over. On a
        RegistryError, ``sink`` may have had a prefix of the range.
        """
        _check_digest(digest)
        if start < 0 or end < start:
            raise ValueError(f"invalid byte range [{start}, {end})")
        if start == end:
            return 0
        req = _Request(ref, f"bytes {start}-{end - 1} of blob {digest}")
        headers = {"Range": f"bytes={start}-{end - 1}"}
        # Socket timeouts bound each wait, not the whole: a body trickling in a byte at a time
        # would hold a FUSE read for hours. The retry deadline bounds the body too.
        deadline = time.monotonic() + self.retry_deadline
        want = end - start
        done = 0  # bytes handed to sink, over all attempts

        def consume(resp: requests.Response, ep: Endpoint) -> int:
            nonlocal done
            skip = self._range_start(resp, start, end, req, ep) + done
            # A 206 body of about the size asked for is read to its end so the
            # connection goes back to the pool; a 200 (Range ignored) or an
            # oversized 206 is cut off at ``end`` and its connection dropped.
            length = resp.headers.get("Content-Length", "")
            whole = (resp.status_code == 206 and length.isdigit()
                     and int(length) <= end - start + _CHUNK)
            for chunk in _body(resp, deadline, f"registry {ep.host} sent {req.what} of image {ref}"):
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk, skip = chunk[skip:], 0
                if done < want:
                    piece = chunk[:want - done]
                    sink(piece)
                    done += len(piece)
                if done >= want and not whole:
                    break
            if done < want:
                raise TransientError(f"registry {ep.host} sent {done} of {want} bytes for "
                                     f"{req.what} of image {ref}")
            return done

        return self._pull(req, "GET", f"blobs/{digest}", consume, headers)

    def open_stream(self, ref: Reference, digest: str, start: int = 0) -> "BlobStream":
        """The blob from ``start`` to its end as a file-like iterator of chunks.

        A connection lost midway is resumed with a Range request (within the
        retry budget); read from 0 to the end, the content is verified.
        """
        _check_digest(digest)
        if start < 0:
            raise ValueError(f"invalid stream start {start}")
        return BlobStream(self, ref, digest, start)

    # ------------------------------------------------------------------ push
    def push_blob(self, ref: Reference, data: bytes | BinaryIO, digest: str, size: int) -> None:
        """Upload a blob unless the registry has it (HEAD first); monolithic POST + PUT."""
        _check_digest(digest)
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data)
            if len(data) != size:
                raise ValueError(f"blob {digest}: {len(data)} bytes given, size says {size}")
            _verify(data, digest, _Request(ref, f"blob {digest}"), None)
        ep, repo = self._push_endpoint(ref)
        req = _Request(ref, f"blob {digest}", actions="pull,push")

        def head() -> bool:
            resp = self._exchange(ep, repo, req, "HEAD", f"/v2/{repo}/blobs/{digest}", {})
            try:
                if resp.status_code == 404:
                    return False
                self._expect(resp, (200,), req, ep)
                return True
            finally:
                _release(resp)

        if self._retrying(req, head):
            log.debug("registry %s already has %s of image %s", ep.host, req.what, ref)
            return
        body = _Body(data)

        def upload() -> None:
            resp = self._exchange(ep, repo, req, "POST", f"/v2/{repo}/blobs/uploads/", {})
            try:
                self._expect(resp, (202,), req, ep)
                location = resp.headers.get("Location")
            finally:
                _release(resp)
            if not location:
                raise RegistryError(f"registry {ep.host} started an upload of {req.what} of image "
                                    f"{ref} without a Location")
            url = _add_query(urljoin(f"{self._scheme(ep)}://{ep.host}/", location), digest=digest)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            resp = self._exchange(ep, repo, req, "PUT", url, headers, body)
            try:
                self._expect(resp, (201, 204), req, ep)
            finally:
                _release(resp)

        self._retrying(req, upload)

    def put_manifest(self, ref: Reference, data: bytes, media_type: str,
                     reference: str | None = None) -> str:
        """Upload a manifest under a tag or digest (default: the ref's tag, else digest).

        Returns the manifest's digest.
        """
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        reference = reference or ref.tag or ref.digest or digest
        req = _Request(ref, f"manifest {reference}", actions="pull,push")
        if ":" in reference:
            _check_digest(reference)
            _verify(data, reference, req, None)
        ep, repo = self._push_endpoint(ref)

        def put() -> None:
            resp = self._exchange(ep, repo, req, "PUT", f"/v2/{repo}/manifests/{reference}",
                                  {"Content-Type": media_type}, _Body(data))
            try:
                self._expect(resp, (201, 200, 204), req, ep)
            finally:
                _release(resp)

        self._retrying(req, put)
        return digest

    # ------------------------------------------------------------- machinery
    def _push_endpoint(self, ref: Reference) -> tuple[Endpoint, str]:
        """Pushes go to the primary location only: mirrors are for pulling."""
        return [p for p in self.conf.endpoints(ref) if not p[0].is_mirror][-1]

    def _ordered_endpoints(self, ref: Reference) -> list[tuple[Endpoint, str]]:
        """registries.conf's order, with the endpoint that last worked for this image first."""
        eps = self.conf.endpoints(ref)
        with self._lock:
            pref = self._preferred.get((ref.registry, ref.repository))
        if pref and time.monotonic() - pref[1] < _PREFERENCE_TTL:
            eps.sort(key=lambda p: (p[0].host, p[1]) != pref[0])
        return eps

    def _pull(self, req: _Request, method: str, path: str,
              consume: Callable[[requests.Response, Endpoint], T],
              headers: dict[str, str] | None = None, keep_open: bool = False) -> T:
        """Run one read against the endpoints in order, with retries.

        A mirror that fails for any reason hands over to the next endpoint;
        definitive answers (404, 401) of the primary are raised at once; only
        endpoints that failed transiently are tried again after a backoff.
        """
        pending = self._ordered_endpoints(req.ref)
        primary = next(p[0] for p in pending if not p[0].is_mirror)
        several = len(pending) > 1

        def one_pass() -> T:
            nonlocal pending
            failed: list[tuple[Endpoint, str]] = []
            transient: TransientError | None = None
            for i, (ep, repo) in enumerate(pending):
                try:
                    result = self._attempt(ep, repo, req, method, f"/v2/{repo}/{path}",
                                           headers or {}, consume, keep_open)
                except TransientError as exc:
                    failed.append((ep, repo))
                    if ep is primary or transient is None:
                        transient = exc
                    err: Exception = exc
                except (RegistryError, VerificationError) as exc:
                    if ep is primary:
                        raise
                    err = exc
                else:
                    if several:
                        with self._lock:
                            self._preferred[(req.ref.registry, req.ref.repository)] = (
                                (ep.host, repo), time.monotonic())
                    return result
                if ep.is_mirror and i + 1 < len(pending):
                    nxt = pending[i + 1][0]
                    log.info("%s; trying %s %s instead", err,
                             "mirror" if nxt.is_mirror else "registry", nxt.host)
            pending = failed
            assert transient is not None
            raise transient

        return self._retrying(req, one_pass)

    def _retrying(self, req: _Request, fn: Callable[[], T]) -> T:
        """Call ``fn`` until it does not raise TransientError, within count and deadline."""
        deadline = time.monotonic() + self.retry_deadline
        attempt = 0
        while True:
            try:
                with request_deadline(deadline):
                    return fn()
            except TransientError as exc:
                attempt += 1
                delay = min(self.max_backoff, self.backoff * (2 ** (attempt - 1)))
                delay *= 0.5 + random.random() / 2
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, self.max_backoff))
                if attempt > self.retries or time.monotonic() + delay > deadline:
                    raise RegistryError(f"{exc} (gave up after {attempt} "
                                        f"attempt{'s' if attempt > 1 else ''})") from None
                log.info("%s; retry %d/%d in %.1f s", exc, attempt, self.retries, delay)
                time.sleep(delay)

    def _attempt(self, ep: Endpoint, repo: str, req: _Request, method: str, target: str,
                 headers: dict[str, str], consume: Callable[[requests.Response, Endpoint], T],
                 keep_open: bool = False) -> T:
        if method == "GET" and "/blobs/" in target:
            resp = self._blob_exchange(ep, repo, req, target, headers)
        else:
            resp = self._exchange(ep, repo, req, method, target, headers)
        ok = False
        try:
            result = consume(resp, ep)
            ok = True
            return result
        except requests.RequestException as exc:
            raise TransientError(f"registry {ep.host} broke off {req.what} of image {req.ref}: "
                                 f"{_why(exc)}") from None
        finally:
            if not (ok and keep_open):
                _release(resp)

    def _blob_exchange(self, ep: Endpoint, repo: str, req: _Request, target: str,
                       headers: dict[str, str]) -> requests.Response:
        """A blob GET: straight to the storage URL the registry redirected us to last time,
        if we have one that still works, else through the registry (remembering a redirect)."""
        url = self.locations.get(ep.host, target)
        if url is not None:
            try:
                resp = self._send_authed(ep, repo, req, "GET", url, headers, None)
            except (requests.RequestException, AuthError) as exc:
                why = _why(exc) if isinstance(exc, requests.RequestException) else "refused"
            else:
                if resp.status_code in (200, 206):
                    return resp
                why = f"HTTP {resp.status_code}"
                _release(resp)
            self.locations.forget(ep.host, target, url)
            log.info("registry %s: the storage URL it gave for blob %s of image %s no longer "
                     "works (%s); asking the registry again", ep.host, target.rsplit("/", 1)[-1],
                     req.ref, why)
        resp = self._exchange(ep, repo, req, "GET", target, headers)
        if resp.history and resp.status_code in (200, 206) and resp.url:
            self.locations.remember(ep.host, target, resp.url)
            log.debug("registry %s redirects blob %s to %s", ep.host, target.rsplit("/", 1)[-1],
                      _redact_url(resp.url))
        return resp

    def _scheme(self, ep: Endpoint) -> str:
        with self._lock:
            return self._schemes.get(ep.host, "https")

    def _exchange(self, ep: Endpoint, repo: str, req: _Request, method: str, target: str,
                  headers: dict[str, str], body: "_Body | None" = None) -> requests.Response:
        """Send one request (https, then http if insecure), answering a 401 once.

        Returns any response but 5xx/429 and 401, which raise.
        """
        if target.startswith("/"):
            with self._lock:
                known = self._schemes.get(ep.host)
            schemes = [known] if known else (["https", "http"] if ep.insecure else ["https"])
            urls = [f"{s}://{ep.host}{target}" for s in schemes]
        else:
            urls = [target]
        for n, url in enumerate(urls):
            try:
                resp = self._send_authed(ep, repo, req, method, url, headers, body)
            except requests.Timeout:
                raise TransientError(f"registry {ep.host} timed out on {req.what} of image "
                                     f"{req.ref}") from None
            except requests.exceptions.SSLError as exc:
                if n + 1 < len(urls):
                    log.info("registry %s: HTTPS failed (%s); trying plain HTTP, as it is marked "
                             "insecure", ep.host, _why(exc))
                    continue
                if not _tls_is_definitive(exc):  # e.g. a connection reset mid-handshake
                    raise TransientError(f"TLS with registry {ep.host} failed for {req.what} of "
                                         f"image {req.ref} ({_why(exc)})") from None
                raise RegistryError(f"TLS with registry {ep.host} failed for {req.what} of image "
                                    f"{req.ref} ({_why(exc)}); {self._tls_hint(ep, exc)}") from None
            except requests.ConnectionError as exc:
                if n + 1 < len(urls):
                    log.info("registry %s: HTTPS failed (%s); trying plain HTTP, as it is marked "
                             "insecure", ep.host, _why(exc))
                    continue
                raise TransientError(f"registry {ep.host} is unreachable for {req.what} of image "
                                     f"{req.ref} ({_why(exc)})") from None
            except requests.RequestException as exc:
                raise RegistryError(f"request to registry {ep.host} for {req.what} of image "
                                    f"{req.ref} failed: {_why(exc)}") from None
            if target.startswith("/") and len(urls) > 1:
                with self._lock:
                    self._schemes[ep.host] = urlsplit(url).scheme
            status = resp.status_code
            if status == 429 or status >= 500:
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                _release(resp)
                raise TransientError(f"registry {ep.host} answered {status} for {req.what} of "
                                     f"image {req.ref}", retry_after)
            return resp
        raise AssertionError("unreachable")

    def _send_authed(self, ep: Endpoint, repo: str, req: _Request, method: str, url: str,
                     headers: dict[str, str], body: "_Body | None") -> requests.Response:
        same_host = urlsplit(url).netloc == ep.host
        auth = self.auth.header_for(ep.host, repo, req.actions) if same_host else None
        resp = self._send(ep, method, url, headers, body, auth)
        if resp.status_code != 401 or not same_host:
            return resp
        www = resp.headers.get("WWW-Authenticate", "")
        _release(resp)
        auth = self.auth.answer(ep.host, repo, req.actions, www, ep.insecure, stale=auth)
        resp = self._send(ep, method, url, headers, body, auth)
        if resp.status_code == 401:
            _release(resp)
            self.auth.forget(ep.host, repo, req.actions, auth)
            creds = self._credentials(ep.host, repo)
            who = creds.describe() if creds else "anonymous access (no credentials found)"
            raise AuthError(f"registry {ep.host} refused {who} for {req.what} of image {req.ref}")
        return resp

    def _send(self, ep: Endpoint, method: str, url: str, headers: dict[str, str],
              body: "_Body | None", auth: str | None) -> requests.Response:
        h = dict(headers)
        if auth:
            h["Authorization"] = auth
        verify = not ep.insecure
        if not verify and url.startswith("https:"):
            self._note_insecure(ep.host)
        log.debug("%s %s", method, _redact_url(url))
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
        if _tls_wants_client_cert(exc):
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

    def _expect(self, resp: requests.Response, ok: tuple[int, ...], req: _Request,
                ep: Endpoint | None) -> None:
        """Raise the RegistryError that an unexpected status means."""
        status = resp.status_code
        if status in ok:
            return
        host = ep.host if ep else "registry"
        detail = _error_detail(resp)
        where = f"{req.what} of image {req.ref}"
        if status == 404:
            raise NotFoundError(f"registry {host} has no {where}{detail}")
        if status in (401, 403):
            raise AuthError(f"registry {host} denied access to {where} (HTTP {status}){detail}")
        if status == 416:
            raise RegistryError(f"registry {host} cannot serve {where}: range not satisfiable "
                                f"(beyond the end of the blob?){detail}")
        raise RegistryError(f"registry {host} answered HTTP {status} for {where}{detail}")

    def _range_start(self, resp: requests.Response, start: int, end: int, req: _Request,
                     ep: Endpoint) -> int:
        """Check a range response; return how many body bytes to skip before ``start``."""
        if resp.status_code == 200:
            log.debug("registry %s ignored Range for %s; reading the body up to byte %d",
                      ep.host, req.what, end)
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) < end:
                raise RegistryError(f"registry {ep.host}: {req.what} of image {req.ref} is beyond "
                                    f"the end of the blob ({length} bytes)")
            return start
        self._expect(resp, (206,), req, ep)
        m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
        if not m:
            raise RegistryError(f"registry {ep.host} answered {req.what} of image {req.ref} "
                                "with a missing or malformed Content-Range")
        first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
        if first > start or last < end - 1:
            size = f" ({total} bytes)" if total != "*" else ""
            raise RegistryError(f"registry {ep.host} sent bytes {first}-{last} for {req.what} of "
                                f"image {req.ref}: the range is beyond the end of the blob{size}")
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) != last - first + 1:
            raise RegistryError(f"registry {ep.host} sent a Content-Length that disagrees with "
                                f"its Content-Range for {req.what} of image {req.ref}")
        return start - first


class BlobStream:
    """A blob read sequentially from an offset: ``read(n)``, iteration, ``close()``.

    Resumes after a broken connection from where it stopped (Range request),
    at most ``client.retries`` times; verifies the digest when read from byte 0.
    """

    def __init__(self, client: RegistryClient, ref: Reference, digest: str, start: int):
        self._client = client
        self._ref = ref
        self._digest = digest
        self._start = start
        self.offset = start
        self.size: int | None = None
        self._resp: requests.Response | None = None
        self._chunks: Iterator[bytes] | None = None
        self._buf = b""
        self._eof = False
        self._closed = False
        self._resumes = 0
        self._hash = hashlib.new(digest.split(":")[0]) if start == 0 else None
        self._open()

    def _open(self) -> None:
        offset = self.offset
        req = _Request(self._ref, f"blob {self._digest} from byte {offset}")
        headers = {"Range": f"bytes={offset}-"} if offset else {}

        def consume(resp: requests.Response, ep: Endpoint) -> tuple[requests.Response, int]:
            if resp.status_code == 200:
                skip = offset
                length = resp.headers.get("Content-Length")
                if length and length.isdigit():
                    self.size = int(length)
            else:
                self._client._expect(resp, (206,), req, ep)
                m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
                if not m or int(m.group(1)) > offset:
                    raise RegistryError(f"registry {ep.host} answered {req.what} of image "
                                        f"{self._ref} with a bad Content-Range")
                skip = offset - int(m.group(1))
                if m.group(3) != "*":
                    self.size = int(m.group(3))
            return resp, skip

        resp, skip = self._client._pull(req, "GET", f"blobs/{self._digest}", consume, headers,
                                        keep_open=True)
        self._resp = resp
        self._chunks = self._skipping(resp.iter_content(_CHUNK), skip)

    @staticmethod
    def _skipping(chunks: Iterator[bytes], skip: int) -> Iterator[bytes]:
        for chunk in chunks:
            if skip:
                if len(chunk) <= skip:
                    skip -= len(chunk)
                    continue
                chunk, skip = chunk[skip:], 0
            if chunk:
                yield chunk

    def _next_chunk(self) -> bytes:
        """The next piece of the blob, or b"" at its end."""
        while not self._eof:
            if self._closed:
                raise ValueError("read from a closed blob stream")
            try:
                chunk = next(self._chunks)  # type: ignore[arg-type]
            except StopIteration:
                if self.size is not None and self.offset < self.size:
                    self._resume(f"the connection ended at byte {self.offset} of {self.size}")
                    continue
                self._eof = True
                self._finish()
                return b""
            except requests.RequestException as exc:
                self._resume(_why(exc))
                continue
            self.offset += len(chunk)
            if self._hash is not None:
                self._hash.update(chunk)
            return chunk
        return b""

    def _resume(self, why: str) -> None:
        if self._resp is not None:
            self._resp.close()
        self._resumes += 1
        if self._resumes > self._client.retries:
            raise RegistryError(f"reading blob {self._digest} of image {self._ref} failed at byte "
                                f"{self.offset}: {why} (gave up after {self._resumes} attempts)")
        log.info("reading blob %s of image %s broke off at byte %d (%s); resuming %d/%d",
                 self._digest, self._ref, self.offset, why, self._resumes, self._client.retries)
        self._open()

    def _finish(self) -> None:
        if self._resp is not None:
            self._resp.close()
        if self._hash is not None:
            got = f"{self._digest.split(':')[0]}:{self._hash.hexdigest()}"
            if got != self._digest:
                raise VerificationError(f"blob {self._digest} of image {self._ref} has digest "
                                        f"{got}: the content was altered")

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all the rest with n < 0); b"" at the end."""
        out = bytearray(self._buf)
        self._buf = b""
        while n < 0 or len(out) < n:
            chunk = self._next_chunk()
            if not chunk:
                break
            out += chunk
        if n >= 0 and len(out) > n:
            self._buf = bytes(out[n:])
            del out[n:]
        return bytes(out)

    def __iter__(self) -> Iterator[bytes]:
        if self._buf:
            buf, self._buf = self._buf, b""
            yield buf
        while chunk := self._next_chunk():
            yield chunk

    def close(self) -> None:
        self._closed = True
        if self._resp is not None:
            self._resp.close()
            self._resp = None

    def __enter__(self) -> "BlobStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Body:
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


def _release(resp: requests.Response, drain_limit: int = 64 * 1024) -> None:
    """Close ``resp``, draining a small unread body first so its connection is reused."""
    try:
        length = resp.headers.get("Content-Length", "")
        if not resp.raw.closed and (resp.request.method == "HEAD" or (
                length.isdigit() and int(length) <= drain_limit)):
            resp.content  # noqa: B018 - reading it marks the body consumed
    except (requests.RequestException, AttributeError):
        pass
    resp.close()


def _body(resp: requests.Response, deadline: float, what: str) -> Iterator[bytes]:
    """The response body in pieces as they arrive (one socket read each), until ``deadline``.

    ``iter_content`` waits for whole 64 KiB pieces, so a trickle would never
    reach a deadline check; ``read1`` returns what one read brought.
    """
    read1 = getattr(resp.raw, "read1", None)
    if read1 is None:  # urllib3 < 2: the deadline is checked between whole pieces
        pieces = resp.iter_content(_CHUNK)
    else:
        pieces = iter(lambda: _read1(partial(read1, decode_content=True)), b"")
    for piece in pieces:
        yield piece
        if time.monotonic() > deadline:
            raise RegistryError(f"{what} too slowly: not complete within the request deadline "
                                "(registry.request_deadline)")


def _read1(read1: Callable[[int], bytes]) -> bytes:
    try:
        return read1(_CHUNK)
    except urllib3.exceptions.HTTPError as e:  # what iter_content would have wrapped
        raise requests.ConnectionError(e) from None


def _check_digest(digest: str) -> None:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"invalid digest {digest!r}: expected sha256:<64 hex> or sha512:<128 hex>")


def _verify(data: bytes, digest: str, req: _Request, ep: Endpoint | None) -> None:
    algo = digest.split(":", 1)[0]
    got = f"{algo}:{hashlib.new(algo, data).hexdigest()}"
    if got != digest:
        source = f" from registry {ep.host}" if ep else ""
        raise VerificationError(f"{req.what} of image {req.ref}{source} has digest {got}: "
                                "the content does not match the digest it was asked for")


def _read_limited(resp: requests.Response, limit: int, req: _Request, ep: Endpoint) -> bytes:
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > limit:
        raise RegistryError(f"{req.what} of image {req.ref} at registry {ep.host} is "
                            f"{length} bytes, more than the {limit} bytes allowed")
    out = bytearray()
    for chunk in resp.iter_content(_CHUNK):
        out += chunk
        if len(out) > limit:
            raise RegistryError(f"{req.what} of image {req.ref} at registry {ep.host} is "
                                f"more than the {limit} bytes allowed")
    return bytes(out)


def _media_type_from_json(data: bytes) -> str:
    import json
    try:
        doc = json.loads(data)
    except ValueError:
        return ""
    mt = doc.get("mediaType") if isinstance(doc, dict) else None
    return mt if isinstance(mt, str) else ""


def _error_detail(resp: requests.Response) -> str:
    """The registry's own error codes (distribution's JSON errors), briefly."""
    try:
        if "json" not in resp.headers.get("Content-Type", ""):
            return ""
        doc = resp.json()
        errs = doc.get("errors") if isinstance(doc, dict) else None
        parts = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
                 for e in errs or [] if isinstance(e, dict)]
        return f" ({'; '.join(parts)[:200]})" if parts else ""
    except (ValueError, requests.RequestException):
        return ""


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (requests -> urllib3 -> ssl/socket), a bounded walk."""
    todo, seen = [exc], 0
    while todo and seen < 20:
        e = todo.pop(0)
        seen += 1
        yield e
        nxt = [getattr(e, "reason", None), e.__cause__, e.__context__]
        nxt += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
        todo += [x for x in nxt if isinstance(x, BaseException)]


_CLIENT_CERT_ALERTS = ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_BAD_CERTIFICATE",
                       "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV1_ALERT_UNKNOWN_CA",
                       "SSLV3_ALERT_HANDSHAKE_FAILURE", "TLSV1_ALERT_ACCESS_DENIED")


def _tls_wants_client_cert(exc: BaseException) -> bool:
    """The server refused the handshake over our (missing) client certificate."""
    return any(isinstance(e, ssl.SSLError) and getattr(e, "reason", None) in _CLIENT_CERT_ALERTS
               for e in _causes(exc))


def _tls_is_definitive(exc: BaseException) -> bool:
    """A TLS failure that trying again will not fix: bad certificate, not TLS at all."""
    if _tls_wants_client_cert(exc):
        return True
    for e in _causes(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            return True
        if isinstance(e, ssl.SSLError) and getattr(e, "reason", None) in (
                "WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION",
                "RECORD_LAYER_FAILURE", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG"):
            return True
    return False


def _why(exc: BaseException) -> str:
    """A short cause for a requests exception, without URLs (which may carry upload state)."""
    if isinstance(exc, requests.Timeout):
        return "timed out"
    for e in _causes(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted: {e.verify_message}"
        if isinstance(e, ssl.SSLError) and getattr(e, "reason", None):
            return f"TLS error {e.reason}"
        if isinstance(e, OSError) and not isinstance(e, ssl.SSLError) and e.strerror:
            return e.strerror
    return type(exc).__name__


def _redact_url(url: str) -> str:
    """The URL without its query (upload URLs carry opaque session state)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _add_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
