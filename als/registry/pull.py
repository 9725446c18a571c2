"""Reading from a registry: manifests, small blobs, and byte ranges of layer blobs.

Lazy pulling turns one image pull into thousands of small range reads made
from FUSE threads. Each is sent to the endpoints in the order endpoints.py
gives, within the retry policy; each checks what came back (the digest of a
manifest or config, the Content-Range of a range) before a byte is used, and
a range body is bounded by the request deadline as well, so that a registry
trickling bytes cannot hold a file read for hours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, TypeVar

import requests
import urllib3

from ..errors import RegistryError, TransientError
from ..oci import MANIFEST_TYPES
from ..reference import Reference
from .endpoints import Endpoints
from .exchange import Exchange
from .responses import (CHUNK, CONTENT_RANGE, Operation, check_digest, expect, read_limited,
                        verify)
from .retry import RetryPolicy
from .sysregistries import Endpoint

log = logging.getLogger("als.registry")

MAX_MANIFEST_SIZE = 4 * 1024 * 1024  # the limit containers/image applies too

T = TypeVar("T")


@dataclass
class Manifest:
    """A manifest or index exactly as the registry sent it, with its verified digest."""

    data: bytes
    media_type: str
    digest: str


class Puller:
    """The read side of the registry client (see RegistryClient for the contract)."""

    def __init__(self, http: Exchange, endpoints: Endpoints, retry: RetryPolicy) -> None:
        self.http = http
        self.endpoints = endpoints
        self.retry = retry

    def pull(self, op: Operation, method: str, path: str,
             consume: Callable[[requests.Response, Endpoint], T],
             headers: dict[str, str] | None = None, keep_open: bool = False) -> T:
        """Run one read of ``/v2/<repository>/<path>`` against the image's endpoints, with retries."""
        def attempt(ep: Endpoint, repo: str) -> T:
            return self.http.attempt(ep, repo, op, method, f"/v2/{repo}/{path}", headers or {},
                                     consume, keep_open)

        return self.endpoints.first_answer(op.ref, attempt, self.retry)

    def get_manifest(self, ref: Reference, reference: str | None = None) -> Manifest:
        reference = reference or ref.reference
        by_digest = ":" in reference
        if by_digest:
            check_digest(reference)
        op = Operation(ref, f"manifest {reference}")
        headers = {"Accept": ", ".join(MANIFEST_TYPES)}

        def consume(resp: requests.Response, ep: Endpoint) -> Manifest:
            expect(resp, (200,), op, ep)
            data = read_limited(resp, MAX_MANIFEST_SIZE, op, ep)
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            if media_type not in MANIFEST_TYPES:
                media_type = _media_type_from_json(data) or media_type
            if by_digest:
                verify(data, reference, op, ep)
                digest = reference
            else:
                digest = "sha256:" + hashlib.sha256(data).hexdigest()
            return Manifest(data=data, media_type=media_type, digest=digest)

        return self.pull(op, "GET", f"manifests/{reference}", consume, headers)

    def get_blob(self, ref: Reference, digest: str, max_size: int) -> bytes:
        check_digest(digest)
        op = Operation(ref, f"blob {digest}")

        def consume(resp: requests.Response, ep: Endpoint) -> bytes:
            expect(resp, (200,), op, ep)
            data = read_limited(resp, max_size, op, ep)
            verify(data, digest, op, ep)
            return data

        return self.pull(op, "GET", f"blobs/{digest}", consume)

    def stream_range(self, ref: Reference, digest: str, start: int, end: int,
                     sink: Callable[[bytes], None]) -> int:
        check_digest(digest)
        if start < 0 or end < start:
            raise ValueError(f"invalid byte range [{start}, {end})")
        if start == end:
            return 0
        op = Operation(ref, f"bytes {start}-{end - 1} of blob {digest}")
        headers = {"Range": f"bytes={start}-{end - 1}"}
        # Socket timeouts bound each wait, not the whole: a body trickling in a byte at a time
        # would hold a FUSE read for hours. The retry deadline bounds the body too.
        deadline = time.monotonic() + self.retry.deadline
        want = end - start
        done = 0  # bytes handed to sink, over all attempts

        def consume(resp: requests.Response, ep: Endpoint) -> int:
            nonlocal done
            skip = _range_start(resp, start, end, op, ep) + done
            # A 206 body of about the size asked for is read to its end so the
            # connection goes back to the pool; a 200 (Range ignored) or an
            # oversized 206 is cut off at ``end`` and its connection dropped.
            length = resp.headers.get("Content-Length", "")
            whole = (resp.status_code == 206 and length.isdigit()
                     and int(length) <= end - start + CHUNK)
            for chunk in _body(resp, deadline, f"registry {ep.host} sent {op.what} of image {ref}"):
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
                                     f"{op.what} of image {ref}")
            return done

        return self.pull(op, "GET", f"blobs/{digest}", consume, headers)

    def read_tail(self, ref: Reference, digest: str, length: int) -> tuple[int, bytes] | None:
        check_digest(digest)
        if length <= 0:
            raise ValueError(f"invalid tail length {length}")
        op = Operation(ref, f"last {length} bytes of blob {digest}")

        def consume(resp: requests.Response, ep: Endpoint) -> tuple[int, bytes] | None:
            if resp.status_code == 200:
                # Range ignored (a pull-through cache does so for a blob it has not cached yet): the
                # whole blob is not read for its tail. An answer all the same: no other endpoint is asked.
                resp.close()
                return None
            expect(resp, (206,), op, ep)
            m = CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
            if not m or m.group(3) == "*":
                raise RegistryError(f"registry {ep.host} answered {op.what} of image {ref} "
                                    "with a missing or malformed Content-Range")
            first, last, total = int(m.group(1)), int(m.group(2)), int(m.group(3))
            if last != total - 1 or first > last or last - first + 1 != min(length, total):
                raise RegistryError(f"registry {ep.host} sent bytes {first}-{last} of {total} for "
                                    f"{op.what} of image {ref}")
            data = read_limited(resp, last - first + 1, op, ep)
            if len(data) != last - first + 1:
                raise TransientError(f"registry {ep.host} sent {len(data)} of {last - first + 1} "
                                     f"bytes for {op.what} of image {ref}")
            return first, data

        return self.pull(op, "GET", f"blobs/{digest}", consume, {"Range": f"bytes=-{length}"})


def _range_start(resp: requests.Response, start: int, end: int, op: Operation,
                 ep: Endpoint) -> int:
    """Check a range response; return how many body bytes to skip before ``start``."""
    if resp.status_code == 200:
        log.debug("registry %s ignored Range for %s; reading the body up to byte %d",
                  ep.host, op.what, end)
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) < end:
            raise RegistryError(f"registry {ep.host}: {op.what} of image {op.ref} is beyond "
                                f"the end of the blob ({length} bytes)")
        return start
    expect(resp, (206,), op, ep)
    m = CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
    if not m:
        raise RegistryError(f"registry {ep.host} answered {op.what} of image {op.ref} "
                            "with a missing or malformed Content-Range")
    first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
    if first > start or last < end - 1:
        size = f" ({total} bytes)" if total != "*" else ""
        raise RegistryError(f"registry {ep.host} sent bytes {first}-{last} for {op.what} of "
                            f"image {op.ref}: the range is beyond the end of the blob{size}")
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) != last - first + 1:
        raise RegistryError(f"registry {ep.host} sent a Content-Length that disagrees with "
                            f"its Content-Range for {op.what} of image {op.ref}")
    return start - first


def _body(resp: requests.Response, deadline: float, what: str) -> Iterator[bytes]:
    """The response body in pieces as they arrive (one socket read each), until ``deadline``.

    ``iter_content`` waits for whole 64 KiB pieces, so a trickle would never
    reach a deadline check; ``read1`` returns what one read brought.
    """
    read1 = getattr(resp.raw, "read1", None)
    if read1 is None:  # urllib3 < 2: the deadline is checked between whole pieces
        pieces = resp.iter_content(CHUNK)
    else:
        pieces = iter(lambda: _read1(partial(read1, decode_content=True)), b"")
    for piece in pieces:
        yield piece
        if time.monotonic() > deadline:
            raise RegistryError(f"{what} too slowly: not complete within the request deadline "
                                "(registry.request_deadline)")


def _read1(read1: Callable[[int], bytes]) -> bytes:
    try:
        return read1(CHUNK)
    except urllib3.exceptions.HTTPError as e:  # what iter_content would have wrapped
        raise requests.ConnectionError(e) from None


def _media_type_from_json(data: bytes) -> str:
    try:
        doc = json.loads(data)
    except ValueError:
        return ""
    mt = doc.get("mediaType") if isinstance(doc, dict) else None
    return mt if isinstance(mt, str) else ""
