"""Gzip indexes of an image's layers found through its referrers, for images that name none themselves.

`als index` publishes, beside each image manifest it indexes, an OCI 1.1
referrer whose layers are the index blobs, each annotated with the layer
blob it indexes. Podman 4.x asks the store about every layer by its blob
digest, so an ordinary gzip image can be served lazily as it is, once its
referrers say where its indexes are. This costs a request or two per
resolution of such an image (the referrers list, then each referrer's
manifest), so it is done once per image manifest and resolution, and only
for a layer with no TOC annotation of its own.

Nothing here is trusted: the listing only points at candidates. An index is
served only once it hashes to the digest the referrer names and names this
layer's blob digest, size and DiffID (formats/gzindex.py). A registry error,
or no referrer, gives no candidates: the layer is declined as before, the
resolution never fails for it. The referrer manifests are kept in the state
directory, so a restart with the registry away still finds them.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from als.digest import is_sha256
from als.errors import ALSError
from als.formats import gzindex, lazy
from als.oci import GZIP_INDEX_ARTIFACT_TYPE, GZIP_INDEX_LAYER_ANNOTATION, json_object
from als.reference import Reference, parse_reference
from als.registry.client import RegistryClient
from als.store.state import StateDir
from als.wait import wait_for

log = logging.getLogger("als.store")

MAX_REFERRERS = 8  # gzip-index referrers of one manifest read at most (the newest)
MAX_INDEXES = 256  # index descriptors of one referrer taken at most
MAX_REFERRER_SIZE = 1 << 20  # bytes of one referrer manifest


def gzip_indexes(client: RegistryClient, state: StateDir, ref: Reference, manifest_digest: str,
                 label: str) -> dict[str, list[str]]:
    """Layer blob digest -> the digests of the gzip indexes referrers of ``manifest_digest`` name for it,
    newest referrer first; empty when there are none or the registry cannot say."""
    try:
        listed = client.list_referrers(ref, manifest_digest, GZIP_INDEX_ARTIFACT_TYPE)
        digests = [d.digest for d in listed if d.artifact_type == GZIP_INDEX_ARTIFACT_TYPE]
        digests = list(dict.fromkeys(reversed(digests)))[:MAX_REFERRERS]  # the fallback tag appends: newest last
    except ALSError as e:
        digests = state.referrers(manifest_digest)
        log.info("%s: cannot list its referrers (%s); %d saved before", label, e, len(digests))
    found: dict[str, list[str]] = {}
    for digest in digests:
        try:
            data = state.get_blob(digest)
            if data is None:
                data = client.get_manifest(ref, digest).data  # verified against its digest
                if len(data) > MAX_REFERRER_SIZE:
                    raise ALSError(f"it is {len(data)} bytes, over {MAX_REFERRER_SIZE}")
                state.put_blob(digest, data)
                state.add_referrer(manifest_digest, digest)
            for layer, index in _indexes(data, manifest_digest, digest):
                found.setdefault(layer, []).append(index)
        except ALSError as e:
            log.info("%s: referrer %s is unusable: %s", label, digest, e)
    if found:
        log.info("%s: gzip indexes of %d layers found in %d referrers", label, len(found), len(digests))
    return found


def _indexes(data: bytes, subject: str, digest: str) -> list[tuple[str, str]]:
    """(layer blob digest, index digest) of one referrer manifest's index layers."""
    doc = json_object(data, f"referrer {digest}")
    if doc.get("artifactType") != GZIP_INDEX_ARTIFACT_TYPE or (doc.get("subject") or {}).get("digest") != subject:
        raise ALSError(f"it is not a gzip index referrer of {subject}")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ALSError("it has no list of layers")
    out = []
    for d in layers[:MAX_INDEXES]:
        if not isinstance(d, dict) or d.get("mediaType") != gzindex.MEDIA_TYPE:
            continue
        layer = (d.get("annotations") or {}).get(GZIP_INDEX_LAYER_ANNOTATION)
        if is_sha256(layer) and is_sha256(d.get("digest")):
            out.append((layer, d["digest"]))
    return out


class ReferrerListings:
    """The referrers of each resolution's image manifest, listed at most once per resolution.

    A resolution carries the listing as its ``referred`` future: started as
    soon as its manifest is in, beside the config's fetch, when a layer of it
    may need one (``start``), else by the first layer that asks (an image
    rebuilt from saved metadata). Listings run on their own threads, so the
    layers that wait for them can never starve them.
    """

    def __init__(self, client: RegistryClient, state: StateDir, timeout: float):
        self.client, self.state, self.timeout = client, state, timeout
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="als-referrers")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def start(self, res, ref: str, manifest_digest: str, doc: dict) -> None:
        """List the manifest's referrers now if a layer of ``doc`` is plain gzip (no TOC of its own)."""
        layers = doc.get("layers")
        if not isinstance(layers, list) or not any(
                isinstance(l, dict) and lazy.plain_gzip(str(l.get("mediaType", "")), l.get("annotations") or {})
                for l in layers):
            return
        with self._lock:
            if res.referred is not None:
                return
            fut = res.referred = Future()
        try:
            self._pool.submit(self._list, fut, ref, manifest_digest)
        except RuntimeError:  # closing
            fut.set_result({})

    def for_layers(self, res, ref: str, manifest_digest: str):
        """What a plain gzip layer of the resolution ``res`` calls for the gzip indexes its referrers name."""
        def referred() -> dict[str, list[str]]:
            with self._lock:
                fut, mine = res.referred, res.referred is None
                if mine:
                    fut = res.referred = Future()
            if mine:
                self._list(fut, ref, manifest_digest)
            return wait_for(fut, time.monotonic() + self.timeout)

        return referred

    def _list(self, fut: Future, ref: str, manifest_digest: str) -> None:
        try:
            fut.set_result(gzip_indexes(self.client, self.state, parse_reference(ref), manifest_digest,
                                        f"image {ref}"))
        except Exception as e:  # never a failed resolve: no referrer, the layer is declined
            log.warning("image %s: its referrers cannot be read: %s", ref, e)
            fut.set_result({})
