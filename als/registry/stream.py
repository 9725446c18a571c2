"""A whole blob read as a stream, resumed where it broke off.

`als convert` and `als optimize` read each source layer blob whole, often
hundreds of megabytes in one response; a connection lost midway should cost the bytes
not yet read, not the whole transfer. The stream picks up with a Range
request from where it stopped and, read from the start, checks the digest
at the end.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Iterator

import requests

from ..errors import RegistryError, VerificationError
from ..reference import Reference
from .diagnosis import why
from .pull import Puller
from .responses import CHUNK, CONTENT_RANGE, Operation, expect
from .sysregistries import Endpoint

log = logging.getLogger("als.registry")


class BlobStream:
    """A blob read sequentially from an offset: ``read(n)``, iteration, ``close()``.

    Resumes after a broken connection from where it stopped (Range request),
    at most ``retries`` times of the retry policy; verifies the digest when read from byte 0.
    """

    def __init__(self, puller: Puller, ref: Reference, digest: str, start: int):
        self._puller = puller
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
        op = Operation(self._ref, f"blob {self._digest} from byte {offset}")
        headers = {"Range": f"bytes={offset}-"} if offset else {}

        def consume(resp: requests.Response, ep: Endpoint) -> tuple[requests.Response, int]:
            if resp.status_code == 200:
                skip = offset
                length = resp.headers.get("Content-Length")
                if length and length.isdigit():
                    self.size = int(length)
            else:
                expect(resp, (206,), op, ep)
                m = CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
                if not m or int(m.group(1)) > offset:
                    raise RegistryError(f"registry {ep.host} answered {op.what} of image "
                                        f"{self._ref} with a bad Content-Range")
                skip = offset - int(m.group(1))
                if m.group(3) != "*":
                    self.size = int(m.group(3))
            return resp, skip

        resp, skip = self._puller.pull(op, "GET", f"blobs/{self._digest}", consume, headers,
                                        keep_open=True)
        self._resp = resp
        self._chunks = self._skipping(resp.iter_content(CHUNK), skip)

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
                self._resume(why(exc))
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
        if self._resumes > self._puller.retry.retries:
            raise RegistryError(f"reading blob {self._digest} of image {self._ref} failed at byte "
                                f"{self.offset}: {why} (gave up after {self._resumes} attempts)")
        log.info("reading blob %s of image %s broke off at byte %d (%s); resuming %d/%d",
                 self._digest, self._ref, self.offset, why, self._resumes, self._puller.retry.retries)
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
