"""A registry held in memory, for tests of the store that need no registry process.

It answers the calls the store makes of its registry client (``get_manifest``,
``get_blob``, ``read_range``, ``stream_range``) from dicts of manifests and
blobs, and takes the calls ``als.tools.image.push_image`` makes
(``push_blob``, ``put_manifest``), so images are built with the project's
own writers and "pushed" here without a socket. It has the referrers API
(``publish_referrer``, ``list_referrers``): a manifest with a ``subject`` is
listed as its referrer, as a distribution-spec 1.1 registry lists it. Its errors are the client's:
``NotFoundError`` for what it lacks, ``RegistryError`` for a failure.

It counts what it serves (``requests``, ``bytes_served``) and can misbehave on
request: fail the next requests (``fail``), hand over part of a range and then
fail (``fail(after=...)``), flip a byte of a blob as it is served
(``tamper``), serve another blob's bytes in its place (``substitute``: well
formed, so only digests can tell), or hold requests until the test releases them (``hold``; the
test learns a request arrived from ``Hold.arrived``, never from a sleep).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Mapping, Sequence

from als.errors import NotFoundError, RegistryError
from als.oci import OCI_EMPTY_DATA, OCI_MANIFEST
from als.reference import Reference
from als.registry.referrers import EMPTY, VIA_API, Descriptor, Published, artifact_manifest

MANIFEST, BLOB, RANGE, REFERRERS = "manifest", "blob", "range", "referrers"  # the kinds of request counted
# and misbehaved on (a referrers list is named by its subject's digest)
HOLD_LIMIT = 10.0  # seconds a held request waits for its release at most: a test that forgets ends anyway
PIECE = 64 << 10  # a range is streamed in pieces of this size, as a network body would be


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class ManifestReply:
    """What ``get_manifest`` answers: the bytes, their media type and their digest (the client's fields)."""

    data: bytes
    media_type: str
    digest: str


@dataclass(frozen=True)
class Served:
    """One request as the registry saw it; ``start``/``end`` for ranges."""

    kind: str
    name: str  # a tag or digest for manifests, the blob's digest otherwise
    start: int = 0
    end: int = 0


@dataclass
class Fault:
    """Failures for requests of ``kind`` (of ``digest``, or any): the next ``times`` of them."""

    kind: str
    digest: str | None = None
    times: int = 1
    after: int = 0  # bytes of a range handed over before it fails
    error: Exception = field(default_factory=lambda: RegistryError("the in-memory registry failed on purpose"))

    def matches(self, kind: str, name: str) -> bool:
        return self.times > 0 and self.kind == kind and self.digest in (None, name)


@dataclass
class Hold:
    """Requests of ``kind`` (of ``digest``, or any) wait for ``release()``, at most ``HOLD_LIMIT`` seconds."""

    kind: str
    digest: str | None = None
    arrived: threading.Event = field(default_factory=threading.Event)  # set when one is waiting
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


class MemoryRegistry:
    """Images by repository and tag or digest, blobs by digest; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}  # (repository name, tag/digest)
        self.requests: list[Served] = []
        self.bytes_served = 0
        self._faults: list[Fault] = []
        self._holds: list[Hold] = []
        self._tampered: dict[str, set[int]] = {}  # digest -> blob offsets whose byte is flipped
        self._substitutes: dict[str, bytes] = {}  # digest -> bytes served as its ranges

    # ---- what push_image calls -----------------------------------------------------------
    def push_blob(self, ref: Reference, data: bytes | BinaryIO, digest: str, size: int) -> None:
        blob = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else data.read()
        if len(blob) != size or sha256(blob) != digest:
            raise ValueError(f"blob {digest}: {len(blob)} bytes with digest {sha256(blob)} given")
        with self._lock:
            self.blobs[digest] = blob

    def put_manifest(self, ref: Reference, data: bytes, media_type: str, reference: str | None = None) -> str:
        digest = sha256(data)
        with self._lock:
            for name in {reference or ref.tag or ref.digest or digest, digest}:
                self.manifests[(ref.name, name)] = (data, media_type)
        return digest

    def publish_referrer(self, ref: Reference, subject: Descriptor, artifact_type: str,
                         layers: Sequence[Descriptor], annotations: Mapping[str, str] | None = None,
                         config: Descriptor | None = None) -> Published:
        data = artifact_manifest(subject, artifact_type, layers, annotations, config)
        if config is None:
            self.push_blob(ref, OCI_EMPTY_DATA, EMPTY.digest, EMPTY.size)
        digest = self.put_manifest(ref, data, OCI_MANIFEST, sha256(data))
        return Published(Descriptor(OCI_MANIFEST, digest, len(data), artifact_type, dict(annotations or {})),
                         VIA_API)

    def list_referrers(self, ref: Reference, subject_digest: str,
                       artifact_type: str | None = None) -> list[Descriptor]:
        """Every manifest of the repository whose ``subject`` is ``subject_digest``, in push order."""
        self._arrive(REFERRERS, subject_digest)
        with self._lock:
            stored = [(name, data, mt) for (repo, name), (data, mt) in self.manifests.items()
                      if repo == ref.name and name == sha256(data)]
        found = []
        for digest, data, media_type in stored:
            doc = json.loads(data)
            if not isinstance(doc, dict) or (doc.get("subject") or {}).get("digest") != subject_digest:
                continue
            kind = doc.get("artifactType") or doc.get("config", {}).get("mediaType")
            if artifact_type is None or kind == artifact_type:
                found.append(Descriptor(media_type, digest, len(data), kind, doc.get("annotations", {})))
        return found

    # ---- what the store calls ------------------------------------------------------------
    def get_manifest(self, ref: Reference, reference: str | None = None) -> ManifestReply:
        name = reference or ref.reference
        self._arrive(MANIFEST, name)
        with self._lock:
            found = self.manifests.get((ref.name, name))
        if found is None:
            raise NotFoundError(f"the in-memory registry has no manifest {name} of {ref.name}")
        self._count(len(found[0]))
        return ManifestReply(found[0], found[1], sha256(found[0]))

    def get_blob(self, ref: Reference, digest: str, max_size: int) -> bytes:
        self._arrive(BLOB, digest)
        blob = self._blob(ref, digest)
        if len(blob) > max_size:
            raise RegistryError(f"blob {digest} of {ref} is {len(blob)} bytes, over {max_size}")
        self._count(len(blob))
        return blob

    def read_range(self, ref: Reference, digest: str, start: int, end: int) -> bytes:
        out = bytearray()
        self.stream_range(ref, digest, start, end, out.extend)
        return bytes(out)

    def stream_range(self, ref: Reference, digest: str, start: int, end: int,
                     sink: Callable[[bytes], None]) -> int:
        fault = self._arrive(RANGE, digest, start, end)
        blob = self._blob(ref, digest)
        with self._lock:
            blob = self._substitutes.get(digest, blob)
        if not 0 <= start <= end <= len(blob):
            raise RegistryError(f"range [{start}, {end}) is outside blob {digest} of {len(blob)} bytes")
        data = bytearray(blob[start:end])
        with self._lock:
            for offset in self._tampered.get(digest, ()):
                if start <= offset < end:
                    data[offset - start] ^= 0xFF
        limit = min(fault.after, len(data)) if fault is not None else len(data)
        for i in range(0, limit, PIECE):
            piece = bytes(data[i:min(i + PIECE, limit)])
            self._count(len(piece))
            sink(piece)
        if fault is not None:
            raise fault.error
        return len(data)

    # ---- misbehaviour --------------------------------------------------------------------
    def fail(self, kind: str, digest: str | None = None, *, times: int = 1, after: int = 0,
             error: Exception | None = None) -> Fault:
        """Make the next ``times`` requests of ``kind`` fail (ranges: after ``after`` bytes)."""
        fault = Fault(kind, digest, times, after)
        if error is not None:
            fault.error = error
        with self._lock:
            self._faults.append(fault)
        return fault

    def tamper(self, digest: str, offset: int) -> None:
        """Flip the byte at ``offset`` of blob ``digest`` in everything served from now on."""
        with self._lock:
            self._tampered.setdefault(digest, set()).add(offset)

    def substitute(self, digest: str, data: bytes) -> None:
        """Serve ranges of blob ``digest`` from ``data`` from now on (the same size)."""
        with self._lock:
            self._substitutes[digest] = data

    def hold(self, kind: str, digest: str | None = None) -> Hold:
        """Hold requests of ``kind`` until the returned hold is released."""
        h = Hold(kind, digest)
        with self._lock:
            self._holds.append(h)
        return h

    def served(self, kind: str, name: str | None = None) -> list[Served]:
        """The requests of ``kind`` (for ``name``) so far."""
        with self._lock:
            return [s for s in self.requests if s.kind == kind and name in (None, s.name)]

    # ---- inside ------------------------------------------------------------------------------
    def _blob(self, ref: Reference, digest: str) -> bytes:
        with self._lock:
            blob = self.blobs.get(digest)
        if blob is None:
            raise NotFoundError(f"the in-memory registry has no blob {digest} of {ref.name}")
        return blob

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_served += n

    def _arrive(self, kind: str, name: str, start: int = 0, end: int = 0) -> Fault | None:
        """Count a request, wait out any hold on it, and take the fault it meets (raised at once if it
        hands over nothing)."""
        with self._lock:
            self.requests.append(Served(kind, name, start, end))
            holds = [h for h in self._holds if h.kind == kind and h.digest in (None, name)]
        for h in holds:
            h.arrived.set()
            h.released.wait(HOLD_LIMIT)
        with self._lock:
            fault = next((f for f in self._faults if f.matches(kind, name)), None)
            if fault is not None:
                fault.times -= 1
        if fault is not None and (kind != RANGE or not fault.after):
            raise fault.error
        return fault
