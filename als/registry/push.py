"""Writing to a registry: blob uploads and manifests.

Only the image tools push (`als convert`, `als optimize`), always to the
image's registry itself, never a mirror. A blob the registry already holds
is not sent again; a body is verified against its digest before it leaves,
and sent again from its start when a retry or a 401 needs it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

from ..errors import RegistryError
from ..reference import Reference
from .endpoints import Endpoints
from .exchange import Body, Exchange
from .responses import Operation, check_digest, expect, release, verify
from .retry import RetryPolicy

log = logging.getLogger("als.registry")


class Pusher:
    """The write side of the registry client (see RegistryClient for the contract)."""

    def __init__(self, http: Exchange, endpoints: Endpoints, retry: RetryPolicy) -> None:
        self.http = http
        self.endpoints = endpoints
        self.retry = retry

    def push_blob(self, ref: Reference, data: bytes | BinaryIO, digest: str, size: int) -> None:
        check_digest(digest)
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data)
            if len(data) != size:
                raise ValueError(f"blob {digest}: {len(data)} bytes given, size says {size}")
            verify(data, digest, Operation(ref, f"blob {digest}"), None)
        ep, repo = self.endpoints.for_push(ref)
        op = Operation(ref, f"blob {digest}", actions="pull,push")

        def head() -> bool:
            resp = self.http.request(ep, repo, op, "HEAD", f"/v2/{repo}/blobs/{digest}", {})
            try:
                if resp.status_code == 404:
                    return False
                expect(resp, (200,), op, ep)
                return True
            finally:
                release(resp)

        if self.retry.run(head):
            log.debug("registry %s already has %s of image %s", ep.host, op.what, ref)
            return
        body = Body(data)

        def upload() -> None:
            resp = self.http.request(ep, repo, op, "POST", f"/v2/{repo}/blobs/uploads/", {})
            try:
                expect(resp, (202,), op, ep)
                location = resp.headers.get("Location")
            finally:
                release(resp)
            if not location:
                raise RegistryError(f"registry {ep.host} started an upload of {op.what} of image "
                                    f"{ref} without a Location")
            url = _add_query(urljoin(f"{self.http.scheme(ep)}://{ep.host}/", location),
                             digest=digest)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            resp = self.http.request(ep, repo, op, "PUT", url, headers, body)
            try:
                expect(resp, (201, 204), op, ep)
            finally:
                release(resp)

        self.retry.run(upload)

    def mount_blob(self, ref: Reference, digest: str, source: Reference) -> bool:
        """Ask the registry to link a blob of ``source``'s repository into ``ref``'s, without an upload.

        Returns whether it did (201). A registry that declines answers 202 with
        an upload session instead, which is cancelled here: the caller uploads.
        Both repositories must be on the registry ``ref`` pushes to.
        """
        check_digest(digest)
        ep, repo = self.endpoints.for_push(ref)
        src_ep, src_repo = self.endpoints.for_push(source)
        if src_ep.host != ep.host:
            return False
        op = Operation(ref, f"blob {digest} (mounted from {source.repository})", actions="pull,push")

        def mount() -> bool:
            path = _add_query(f"/v2/{repo}/blobs/uploads/", mount=digest, **{"from": src_repo})
            resp = self.http.request(ep, repo, op, "POST", path, {})
            try:
                expect(resp, (201, 202), op, ep)
                mounted, location = resp.status_code == 201, resp.headers.get("Location")
            finally:
                release(resp)
            if not mounted and location:
                url = urljoin(f"{self.http.scheme(ep)}://{ep.host}/", location)
                release(self.http.request(ep, repo, op, "DELETE", url, {}))
            return mounted

        return self.retry.run(mount)

    def put_manifest(self, ref: Reference, data: bytes, media_type: str,
                     reference: str | None = None) -> str:
        return self.send_manifest(ref, data, media_type, reference).digest

    def send_manifest(self, ref: Reference, data: bytes, media_type: str,
                      reference: str | None = None) -> PutManifest:
        """put_manifest, keeping what the registry said of a ``subject`` (OCI-Subject)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        reference = reference or ref.tag or ref.digest or digest
        op = Operation(ref, f"manifest {reference}", actions="pull,push")
        if ":" in reference:
            check_digest(reference)
            verify(data, reference, op, None)
        ep, repo = self.endpoints.for_push(ref)

        def put() -> PutManifest:
            resp = self.http.request(ep, repo, op, "PUT", f"/v2/{repo}/manifests/{reference}",
                                     {"Content-Type": media_type}, Body(data))
            try:
                expect(resp, (201, 200, 204), op, ep)
                return PutManifest(digest, resp.headers.get("OCI-Subject", "").strip() or None)
            finally:
                release(resp)

        return self.retry.run(put)


@dataclass(frozen=True)
class PutManifest:
    """A manifest the registry took: its digest, and the OCI-Subject header of the answer
    (a registry with the referrers API names the subject it recorded there)."""

    digest: str
    oci_subject: str | None


def _add_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
