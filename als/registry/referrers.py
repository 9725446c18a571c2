"""OCI 1.1 referrers: artifacts published beside an image, found through its manifest digest.

An artifact that describes an image without changing it (a seekable index of
its gzip layers, a signature) is a manifest whose ``subject`` names the
image's manifest; the image keeps its digest, and readers find the artifact
by asking for the image's referrers. Registries of distribution-spec 1.1
answer ``GET /v2/<name>/referrers/<digest>`` themselves. Older ones (Debian's
docker-registry 2.8 among them) do not, and the spec's fallback applies: a
tag named after the subject's digest holds an OCI index of its referrers,
kept up to date by whoever pushes one. Anything read here comes from a
registry we do not trust: every answer is bounded in size and pages, and
must be an OCI index of well-formed descriptors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence
from urllib.parse import quote, urlsplit

import requests

from ..errors import NotFoundError, ReferrersError, RegistryError
from ..oci import MANIFEST_TYPES, OCI_EMPTY, OCI_EMPTY_DATA, OCI_INDEX, OCI_MANIFEST, json_object
from ..reference import Reference
from .endpoints import Endpoints
from .exchange import Exchange
from .pull import MAX_MANIFEST_SIZE
from .push import Pusher
from .responses import Operation, check_digest, expect, read_limited
from .retry import RetryPolicy
from .sysregistries import Endpoint

log = logging.getLogger("als.registry")

MAX_INDEX_SIZE = MAX_MANIFEST_SIZE  # one page of the referrers API, or the fallback tag's index
MAX_PAGES = 16  # pages of one referrers API answer followed at most
MAX_REFERRERS = 10_000  # descriptors of one subject accepted at most, over all pages
NO_API_TTL = 600.0  # seconds a registry that has no referrers API is read through the fallback tag alone
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"  # of b"{}"
VIA_API, VIA_TAG = "api", "tag"  # how a referrer was published

_TAG_FORBIDDEN = re.compile(r"[^a-zA-Z0-9_.-]")


@dataclass
class Descriptor:
    """An OCI content descriptor: what the referrers list holds, and what a publish refers to."""

    media_type: str
    digest: str
    size: int
    artifact_type: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        out: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_json(cls, obj: object, what: str) -> "Descriptor":
        """A descriptor from a registry's JSON; ReferrersError names what is malformed."""
        if not isinstance(obj, dict):
            raise ReferrersError(f"{what} is not a JSON object")
        media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        artifact_type, annotations = obj.get("artifactType"), obj.get("annotations", {})
        if not isinstance(media_type, str) or not media_type:
            raise ReferrersError(f"{what} has no mediaType")
        try:
            check_digest(digest)  # type: ignore[arg-type]
        except ValueError:
            raise ReferrersError(f"{what} has an invalid digest {str(digest)[:80]!r}") from None
        if type(size) is not int or size < 0:
            raise ReferrersError(f"{what} has an invalid size {str(size)[:40]!r}")
        if artifact_type is not None and not isinstance(artifact_type, str):
            raise ReferrersError(f"{what} has an artifactType that is not a string")
        if not isinstance(annotations, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise ReferrersError(f"{what} has annotations that are not strings")
        return cls(media_type, digest, size, artifact_type or None, dict(annotations))


EMPTY = Descriptor(OCI_EMPTY, EMPTY_DIGEST, len(OCI_EMPTY_DATA))


@dataclass(frozen=True)
class Published:
    """A referrer pushed: its descriptor as referrers lists show it, and how it was recorded
    (``VIA_API``: the registry lists it itself; ``VIA_TAG``: added to the fallback tag ``tag``)."""

    descriptor: Descriptor
    via: str
    tag: str | None = None


def referrers_tag(digest: str) -> str:
    """The fallback tag of a subject: algorithm (32 chars at most), '-', encoded part (64 at most),
    with characters a tag may not hold replaced by '-'."""
    algorithm, sep, encoded = digest.partition(":")
    if not sep or not algorithm or not encoded:
        raise ValueError(f"invalid digest {digest!r}")
    return _TAG_FORBIDDEN.sub("-", f"{algorithm[:32]}-{encoded[:64]}")


def artifact_manifest(subject: Descriptor, artifact_type: str, layers: Sequence[Descriptor],
                      annotations: Mapping[str, str] | None = None,
                      config: Descriptor | None = None) -> bytes:
    """The bytes of an OCI 1.1 artifact manifest referring to ``subject``.

    Without a config the empty descriptor stands in for it (and for the layers
    when there are none, as image-spec 1.1 asks for portability); the subject
    keeps only mediaType, digest and size.
    """
    if not isinstance(artifact_type, str) or not artifact_type:
        raise ValueError("an artifact manifest needs an artifactType")
    for d in (subject, *layers, *([config] if config else [])):
        check_digest(d.digest)
    doc: dict = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
                 "config": (config or EMPTY).to_json(),
                 "layers": [d.to_json() for d in layers] or [EMPTY.to_json()],
                 "subject": Descriptor(subject.media_type, subject.digest, subject.size).to_json()}
    if annotations:
        doc["annotations"] = dict(annotations)
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class _Page:
    referrers: list[Descriptor]
    next: str | None  # the Link rel="next" target


class _NoReferrersAPI(NotFoundError):
    """A 404 that is no registry's error document: the registry has no such route (no referrers API)."""


class Referrers:
    """Publishing and listing referrers (see RegistryClient for the contract)."""

    def __init__(self, http: Exchange, endpoints: Endpoints, retry: RetryPolicy,
                 pusher: Pusher) -> None:
        self.http = http
        self.endpoints = endpoints
        self.retry = retry
        self.pusher = pusher
        # registry -> when it answered that it has no referrers API: a store lists the referrers of
        # plain gzip images on each resolution, and asking twice (API, then tag) each time is a waste
        self._no_api: dict[str, float] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ publish
    def publish(self, ref: Reference, subject: Descriptor, artifact_type: str,
                layers: Sequence[Descriptor], annotations: Mapping[str, str] | None = None,
                config: Descriptor | None = None) -> Published:
        data = artifact_manifest(subject, artifact_type, layers, annotations, config)
        if config is None:
            self.pusher.push_blob(ref, OCI_EMPTY_DATA, EMPTY_DIGEST, len(OCI_EMPTY_DATA))
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        put = self.pusher.send_manifest(ref, data, OCI_MANIFEST, digest)
        listed = Descriptor(OCI_MANIFEST, put.digest, len(data), artifact_type,
                            dict(annotations or {}))
        if put.oci_subject == subject.digest:
            log.info("registry recorded %s as a referrer of image %s@%s (OCI-Subject)",
                     artifact_type, ref.name, subject.digest)
            return Published(listed, VIA_API)
        ep, repo = self.endpoints.for_push(ref)
        if self._has_api(ref, ep, repo, subject.digest):
            log.info("registry %s lists referrers itself; %s of image %s@%s needs no tag",
                     ep.host, artifact_type, ref.name, subject.digest)
            return Published(listed, VIA_API)
        tag = referrers_tag(subject.digest)
        self._add_to_tag(ref, ep, repo, tag, listed)
        return Published(listed, VIA_TAG, tag)

    def _has_api(self, ref: Reference, ep: Endpoint, repo: str, subject: str) -> bool:
        """Whether the registry we push to answers the referrers API (a 404 says it does not)."""
        op = Operation(ref, f"referrers of {subject}", actions="pull,push")
        try:
            self.retry.run(lambda: self.http.attempt(
                ep, repo, op, "GET", f"/v2/{repo}/referrers/{subject}",
                {"Accept": OCI_INDEX}, lambda resp, ep_: self._page(resp, ep_, op)))
        except NotFoundError:
            return False
        return True

    def _add_to_tag(self, ref: Reference, ep: Endpoint, repo: str, tag: str,
                    listed: Descriptor) -> None:
        """Read-modify-write of the fallback tag's index. Two writers at once can lose an entry:
        the spec leaves that race to clients, and registries with the API do not have it."""
        op = Operation(ref, f"referrers tag {tag}", actions="pull,push")

        def read(resp: requests.Response, ep_: Endpoint) -> tuple[dict, list[Descriptor]] | None:
            if resp.status_code == 404:
                return None
            expect(resp, (200,), op, ep_)
            return _index(resp, op, ep_)

        found = self.retry.run(lambda: self.http.attempt(
            ep, repo, op, "GET", f"/v2/{repo}/manifests/{tag}",
            {"Accept": ", ".join(MANIFEST_TYPES)}, read))
        doc, entries = found or ({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}, [])
        if any(e.digest == listed.digest for e in entries):
            log.info("referrers tag %s of image %s already lists %s", tag, ref.name, listed.digest)
            return
        kept: dict[str, dict] = {}  # one entry per digest, the first, as written (fields we do not know kept)
        for entry, e in zip(doc["manifests"], entries):
            kept.setdefault(e.digest, entry)
        doc["manifests"] = list(kept.values()) + [listed.to_json()]
        self.pusher.put_manifest(ref, json.dumps(doc, separators=(",", ":")).encode(), OCI_INDEX,
                                 tag)
        log.info("added %s to referrers tag %s of image %s (%d referrers)", listed.digest, tag,
                 ref.name, len(doc["manifests"]))

    # ------------------------------------------------------------------ list
    def list(self, ref: Reference, subject: str,
             artifact_type: str | None = None) -> list[Descriptor]:
        check_digest(subject)
        with self._lock:
            since = self._no_api.get(ref.registry)
        if since is not None and time.monotonic() - since < NO_API_TTL:
            found = self._from_tag(ref, subject)
        else:
            try:
                found = self._from_api(ref, subject, artifact_type)
            except _NoReferrersAPI:
                with self._lock:
                    self._no_api[ref.registry] = time.monotonic()
                found = self._from_tag(ref, subject)
            except NotFoundError:
                found = self._from_tag(ref, subject)
        if artifact_type is not None:  # OCI-Filters-Applied or not: a registry's word is not enough
            found = [d for d in found if d.artifact_type == artifact_type]
        return found

    def _from_api(self, ref: Reference, subject: str,
                  artifact_type: str | None) -> list[Descriptor]:
        op = Operation(ref, f"referrers of {subject}")
        target = f"referrers/{subject}"
        if artifact_type is not None:
            target += f"?artifactType={quote(artifact_type, safe='')}"
        headers = {"Accept": OCI_INDEX}

        def first(ep: Endpoint, repo: str) -> tuple[Endpoint, str, _Page]:
            return ep, repo, self.http.attempt(ep, repo, op, "GET", f"/v2/{repo}/{target}",
                                               headers, lambda r, e: self._page(r, e, op))

        ep, repo, page = self.endpoints.first_answer(ref, first, self.retry)
        found = list(page.referrers)
        pages = 1
        while page.next is not None:
            if pages >= MAX_PAGES:
                raise ReferrersError(f"registry {ep.host} lists the {op.what} of image {ref} in "
                                     f"more than {MAX_PAGES} pages")
            link = _same_host(page.next, ep, op)
            page = self.retry.run(lambda: self.http.attempt(
                ep, repo, op, "GET", link, headers, lambda r, e: self._page(r, e, op)))
            pages += 1
            found += page.referrers
            if len(found) > MAX_REFERRERS:
                raise ReferrersError(f"registry {ep.host} lists more than {MAX_REFERRERS} "
                                     f"{op.what} of image {ref}")
        return found

    def _page(self, resp: requests.Response, ep: Endpoint, op: Operation) -> _Page:
        """One referrers API answer; a 404 (no API) raises NotFoundError."""
        if resp.status_code == 404 and "json" not in resp.headers.get("Content-Type", ""):
            raise _NoReferrersAPI(f"registry {ep.host} has no referrers API")
        expect(resp, (200,), op, ep)
        nxt = resp.links.get("next", {}).get("url")
        return _Page(_index(resp, op, ep)[1], nxt or None)

    def _from_tag(self, ref: Reference, subject: str) -> list[Descriptor]:
        """The fallback tag's index; none, or not a valid index, means no referrers (as the spec
        says), so a registry with neither API nor tag gives an empty list."""
        tag = referrers_tag(subject)
        op = Operation(ref, f"referrers tag {tag}")

        def consume(resp: requests.Response, ep: Endpoint) -> list[Descriptor]:
            expect(resp, (200,), op, ep)
            return _index(resp, op, ep)[1]

        def read(ep: Endpoint, repo: str) -> list[Descriptor]:
            return self.http.attempt(ep, repo, op, "GET", f"/v2/{repo}/manifests/{tag}",
                                     {"Accept": ", ".join(MANIFEST_TYPES)}, consume)

        try:
            return self.endpoints.first_answer(ref, read, self.retry)
        except NotFoundError:
            return []
        except ReferrersError as exc:
            log.warning("%s; taking it as no referrers", exc)
            return []


def _index(resp: requests.Response, op: Operation, ep: Endpoint) -> tuple[dict, list[Descriptor]]:
    """An OCI index of descriptors from ``resp`` (bounded), or ReferrersError."""
    where = f"{op.what} of image {op.ref} from registry {ep.host}"
    media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
    if media_type != OCI_INDEX:
        raise ReferrersError(f"{where} is {media_type or 'untyped'}, not an OCI index")
    try:
        data = read_limited(resp, MAX_INDEX_SIZE, op, ep)
    except RegistryError as exc:
        raise ReferrersError(str(exc)) from None
    doc = json_object(data, where, ReferrersError)
    if doc.get("schemaVersion") != 2 or doc.get("mediaType", OCI_INDEX) != OCI_INDEX:
        raise ReferrersError(f"{where} is not an OCI index (schemaVersion "
                             f"{str(doc.get('schemaVersion'))[:20]}, mediaType "
                             f"{str(doc.get('mediaType'))[:80]})")
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise ReferrersError(f"{where} has no list of manifests")
    if len(manifests) > MAX_REFERRERS:
        raise ReferrersError(f"{where} lists more than {MAX_REFERRERS} referrers")
    return doc, [Descriptor.from_json(m, f"entry {i} of {where}") for i, m in enumerate(manifests)]


def _same_host(link: str, ep: Endpoint, op: Operation) -> str:
    """A Link target to follow: a path on ``ep``, or a URL on its host; nothing else."""
    if link.startswith("/"):
        return link
    if urlsplit(link).netloc != ep.host:
        raise ReferrersError(f"registry {ep.host} points the next page of {op.what} of image "
                             f"{op.ref} to another host")
    return link

