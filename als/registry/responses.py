"""What a registry answer must be before its bytes are used, and what it means when it is not.

Every pull and push checks statuses, sizes and digests the same way, and
every failure becomes an error that names the image, the object and the
registry, so an operator can act on it; none carries a secret. Responses
are always released, so their connections go back to the pool.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import requests

from ..errors import AuthError, NotFoundError, RegistryError, VerificationError
from ..reference import Reference
from .sysregistries import Endpoint

CHUNK = 64 * 1024  # how much of a body is read at a time
CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")


@dataclass
class Operation:
    """What we are doing, for messages: ``what`` names the object, ``ref`` the image;
    ``actions`` is the token scope it needs."""

    ref: Reference
    what: str
    actions: str = "pull"


def check_digest(digest: str) -> None:
    """Refuse a malformed digest before it becomes part of a URL."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"invalid digest {digest!r}: expected sha256:<64 hex> or sha512:<128 hex>")


def verify(data: bytes, digest: str, op: Operation, ep: Endpoint | None) -> None:
    """Raise VerificationError unless ``data`` has ``digest``."""
    algo = digest.split(":", 1)[0]
    got = f"{algo}:{hashlib.new(algo, data).hexdigest()}"
    if got != digest:
        source = f" from registry {ep.host}" if ep else ""
        raise VerificationError(f"{op.what} of image {op.ref}{source} has digest {got}: "
                                "the content does not match the digest it was asked for")


def expect(resp: requests.Response, ok: tuple[int, ...], op: Operation,
           ep: Endpoint | None) -> None:
    """Raise the RegistryError that an unexpected status means."""
    status = resp.status_code
    if status in ok:
        return
    host = ep.host if ep else "registry"
    detail = error_detail(resp)
    where = f"{op.what} of image {op.ref}"
    if status == 404:
        raise NotFoundError(f"registry {host} has no {where}{detail}")
    if status in (401, 403):
        raise AuthError(f"registry {host} denied access to {where} (HTTP {status}){detail}")
    if status == 416:
        raise RegistryError(f"registry {host} cannot serve {where}: range not satisfiable "
                            f"(beyond the end of the blob?){detail}")
    raise RegistryError(f"registry {host} answered HTTP {status} for {where}{detail}")


def error_detail(resp: requests.Response) -> str:
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


def read_limited(resp: requests.Response, limit: int, op: Operation, ep: Endpoint) -> bytes:
    """The whole body, refused (without reading it all) when larger than ``limit``."""
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > limit:
        raise RegistryError(f"{op.what} of image {op.ref} at registry {ep.host} is "
                            f"{length} bytes, more than the {limit} bytes allowed")
    out = bytearray()
    for chunk in resp.iter_content(CHUNK):
        out += chunk
        if len(out) > limit:
            raise RegistryError(f"{op.what} of image {op.ref} at registry {ep.host} is "
                                f"more than the {limit} bytes allowed")
    return bytes(out)


def release(resp: requests.Response, drain_limit: int = 64 * 1024) -> None:
    """Close ``resp``, draining a small unread body first so its connection is reused."""
    try:
        length = resp.headers.get("Content-Length", "")
        if not resp.raw.closed and (resp.request.method == "HEAD" or (
                length.isdigit() and int(length) <= drain_limit)):
            resp.content  # noqa: B018 - reading it marks the body consumed
    except (requests.RequestException, AttributeError):
        pass
    resp.close()
