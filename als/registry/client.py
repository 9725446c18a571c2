"""The HTTP side of the store: manifests, blobs and byte ranges from registries.

Lazy pulling turns one image pull into thousands of small range requests made
from FUSE threads, so this client keeps connections alive, shares them across
threads, bounds every wait (timeouts, retry counts, a retry deadline) so a
file read fails instead of hanging, and follows registries.conf (mirrors,
rewrites, insecure, blocked) exactly as Podman would for the same image.

``RegistryClient`` is the one entry point; it only puts together the parts
that do the work: endpoints.py and retry.py (where a request goes, how often
it is tried), exchange.py (one HTTP exchange: auth, TLS, scheme probe),
pull.py and stream.py (reading), push.py (writing), referrers.py (OCI 1.1
referrers, with the tag fallback for registries without the API).
"""

from __future__ import annotations

from typing import BinaryIO, Callable, Mapping, Sequence

from .. import __version__
from ..reference import Reference
from .credentials.entries import CredentialLookup
from .credentials.keychain import Keychain
from .endpoints import Endpoints
from .exchange import Exchange
from .pull import Manifest, Puller
from .push import Pusher
from .referrers import Descriptor, Published, Referrers
from .responses import check_digest
from .retry import RetryPolicy
from .stream import BlobStream
from .sysregistries import RegistriesConf
from .tls import TLSContexts

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
        if credentials is None:
            credentials = Keychain(helpers=self.conf.credential_helpers)
        self.keychain = credentials if isinstance(credentials, Keychain) else None
        self.retry = RetryPolicy(retries, backoff, max_backoff, retry_deadline)
        self.http = Exchange(credentials, TLSContexts(certs_dir),
                             timeout=(connect_timeout, read_timeout), pool_size=pool_size,
                             user_agent=user_agent)
        self.session = self.http.session  # for callers that mount their own transport
        self.endpoints = Endpoints(self.conf)
        self._puller = Puller(self.http, self.endpoints, self.retry)
        self._pusher = Pusher(self.http, self.endpoints, self.retry)
        self._referrers = Referrers(self.http, self.endpoints, self.retry, self._pusher)

    def close(self) -> None:
        self.http.close()

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
        return self._puller.get_manifest(ref, reference)

    def get_blob(self, ref: Reference, digest: str, max_size: int) -> bytes:
        """A whole small blob (a config), verified; refuses blobs larger than ``max_size``."""
        return self._puller.get_blob(ref, digest, max_size)

    def read_range(self, ref: Reference, digest: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a blob, exactly, or a RegistryError.

        Asks for ``Range: bytes=start-(end-1)``; a registry that ignores it
        (200) is read only up to ``end`` and the connection dropped.
        """
        out = bytearray()
        self._puller.stream_range(ref, digest, start, end, out.extend)
        return bytes(out)

    def read_tail(self, ref: Reference, digest: str, length: int) -> tuple[int, bytes] | None:
        """The last ``length`` bytes of a blob (all of it if smaller) and where they start, or a
        RegistryError: one suffix range request, for a reader that does not know the blob's size yet.
        None when the registry ignores the range: the whole blob would come, and is not read."""
        return self._puller.read_tail(ref, digest, length)

    def stream_range(self, ref: Reference, digest: str, start: int, end: int,
                     sink: Callable[[bytes], None]) -> int:
        """Hand bytes [start, end) of a blob to ``sink`` in order, as they arrive; returns their count.

        For readers that consume a range piece by piece (the chunk fetcher
        decodes each chunk as soon as its bytes are in), so that a large range
        is never held whole in memory. Each byte reaches ``sink`` exactly once:
        a retry after a broken body skips what was already handed over. On a
        RegistryError, ``sink`` may have had a prefix of the range.
        """
        return self._puller.stream_range(ref, digest, start, end, sink)

    def open_stream(self, ref: Reference, digest: str, start: int = 0) -> BlobStream:
        """The blob from ``start`` to its end as a file-like iterator of chunks.

        A connection lost midway is resumed with a Range request (within the
        retry budget); read from 0 to the end, the content is verified.
        """
        check_digest(digest)
        if start < 0:
            raise ValueError(f"invalid stream start {start}")
        return BlobStream(self._puller, ref, digest, start)

    # ------------------------------------------------------------------ push
    def push_blob(self, ref: Reference, data: bytes | BinaryIO, digest: str, size: int) -> None:
        """Upload a blob unless the registry has it (HEAD first); monolithic POST + PUT."""
        self._pusher.push_blob(ref, data, digest, size)

    def mount_blob(self, ref: Reference, digest: str, source: Reference) -> bool:
        """Link blob ``digest`` of image ``source``'s repository into ``ref``'s (a cross-repository
        mount, no upload); False when the registry declines or they are on different registries."""
        return self._pusher.mount_blob(ref, digest, source)

    def put_manifest(self, ref: Reference, data: bytes, media_type: str,
                     reference: str | None = None) -> str:
        """Upload a manifest under a tag or digest (default: the ref's tag, else digest).

        Returns the manifest's digest.
        """
        return self._pusher.put_manifest(ref, data, media_type, reference)

    # ------------------------------------------------------------- referrers
    def publish_referrer(self, ref: Reference, subject: Descriptor, artifact_type: str,
                         layers: Sequence[Descriptor],
                         annotations: Mapping[str, str] | None = None,
                         config: Descriptor | None = None) -> Published:
        """Push an OCI 1.1 artifact manifest referring to ``subject`` (a manifest of ``ref``'s
        repository), by digest, and make sure the subject's referrers list shows it.

        ``layers`` (and ``config``, else the empty descriptor) are blobs already
        pushed to the repository. A registry that names the subject in
        OCI-Subject, or answers the referrers API, lists it itself; otherwise
        it is added to the subject's fallback tag (``sha256-<hex>``), once.
        Raises ReferrersError when that tag holds something other than an OCI
        index of referrers (it is left alone).
        """
        return self._referrers.publish(ref, subject, artifact_type, layers, annotations, config)

    def list_referrers(self, ref: Reference, subject_digest: str,
                       artifact_type: str | None = None) -> list[Descriptor]:
        """The descriptors of the manifests that refer to ``subject_digest`` in ``ref``'s repository,
        of ``artifact_type`` only if given.

        From the referrers API (every page, within bounds), else from the
        fallback tag; none of either is an empty list. An API answer that is
        not a bounded OCI index of well-formed descriptors raises
        ReferrersError; a fallback tag that is not one counts as no referrers,
        as the distribution spec says.
        """
        return self._referrers.list(ref, subject_digest, artifact_type)
