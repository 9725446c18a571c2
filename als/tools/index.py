"""`als index`: make an image's ordinary gzip layers lazily pullable without converting them.

Conversion rewrites every layer, so the converted image is a second copy to
upload, store and keep in step with its original. An index leaves the layers
alone: for each gzip layer of SRC it writes a small separate blob (its files
and a checkpoint every few MiB, formats/gzindex.py), stores it in DST's
repository, and stores DST as an OCI manifest with SRC's config and layers,
each indexed layer's descriptor naming its index by digest under two keys
(ours, and the eStargz TOC key Podman >= 5.1 asks the store by; docs/gzindex.md
says why). The layer blobs are not uploaded again: they are mounted from
SRC's repository (the registry links them), or are there already when DST is
SRC's repository; only when SRC is on another registry (or an OCI layout) are
they copied.

For engines that ask the store about layers by blob digest (Podman 4.x),
SRC itself can then be served lazily: beside each image manifest of SRC it
indexed, `als index` publishes an OCI 1.1 referrer (artifact type
``GZIP_INDEX_ARTIFACT_TYPE``) whose layers are the index blobs, each
annotated with the layer it indexes (store/referred.py reads them).

Each layer is read once, from SRC into a temporary file (indexed_gzip needs
a seekable file; the download is checked against the layer's digest on the
way), and the index is written from that file span by span. As for `als
convert`, nothing is stored under DST before every layer is indexed: blobs
first, then the manifests, the tagged one last.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from als.digest import sha256_digest
from als.errors import ALSError, FormatError
from als.formats import estargz, gzindex, gzindex_writer
from als.oci import (GZIP_INDEX_ANNOTATION, GZIP_INDEX_ARTIFACT_TYPE, GZIP_INDEX_LAYER_ANNOTATION, IMAGE_TYPES,
                     OCI_CONFIG, OCI_LAYER_FOR_DOCKER, OCI_LAYER_GZIP, OCI_MANIFEST, json_object)
from als.registry.referrers import Descriptor
from als.tools.convert import ConvertError, each_image, put_manifests
from als.tools.progress import Progress
from als.tools.transport import ImageTransport, RegistryImage, TransportError

log = logging.getLogger("als.index")

_PIECE = 1 << 20


@dataclass
class IndexOptions:
    span_size: int = gzindex.DEFAULT_SPAN  # uncompressed bytes between checkpoints
    platform: str = ""  # "os/arch[/variant]": index only this one of an index; the result is one image
    referrers: bool = True  # publish the indexes as a referrer of each SRC image manifest too (a registry SRC)


@dataclass
class IndexedLayer:
    digest: str
    size: int
    index_digest: str = ""  # "" when the layer was left as it is (not gzip, or eStargz already)
    index_size: int = 0
    note: str = ""


@dataclass
class IndexResult:
    digest: str  # of the stored manifest or index
    media_type: str
    images: list[list[IndexedLayer]] = field(default_factory=list)
    referrers: list[str] = field(default_factory=list)  # per SRC image manifest: what became of its referrer


@dataclass
class _Image:
    manifest: bytes
    config: tuple[str, int]
    layers: list[tuple[str, int, Path | None]]  # digest, size, the downloaded file (if any)
    indexes: list[bytes]
    report: list[IndexedLayer]
    platform: dict | None = None
    subject: Descriptor | None = None  # SRC's manifest of this image, which the referrer refers to


def index_image(src: ImageTransport, dst: ImageTransport, options: IndexOptions | None = None,
                progress: Progress | None = None, workdir: str | Path | None = None) -> IndexResult:
    """Index every gzip layer of ``src`` and store the annotated image at ``dst`` (see the module doc)."""
    options = options or IndexOptions()
    progress = progress or Progress(enabled=False)
    if not 0 < options.span_size <= gzindex.MAX_SPAN:
        raise ConvertError(f"span size must be in 1..{gzindex.MAX_SPAN}, not {options.span_size}")
    with tempfile.TemporaryDirectory(prefix="als-index-", dir=workdir) as tmp:
        work = Path(tmp)
        images, index = each_image(src, options.platform, lambda manifest, media_type, label, platform:
                                   _index_image(src, manifest, media_type, options, progress, work, label,
                                                platform))
        result = _store(src, dst, images, index, progress, work)
        if options.referrers:
            result.referrers = [_publish_referrer(src, image, progress) for image in images]
        return result


def _index_image(src, manifest: bytes, media_type: str, options: IndexOptions, progress: Progress, work: Path,
                 label: str, platform: dict | None) -> _Image:
    doc = json_object(manifest, f"manifest of {src}", ConvertError)
    if media_type and media_type not in IMAGE_TYPES and doc.get("mediaType") not in IMAGE_TYPES:
        raise ConvertError(f"{src}: manifest media type {media_type} is not an image manifest")
    try:
        config = doc["config"]
        config_ref = (config["digest"], int(config["size"]))
        layers = [dict(d) for d in doc["layers"]]
    except (KeyError, TypeError, ValueError):
        raise ConvertError(f"manifest of {src} has no config or layers") from None
    descriptors, blobs, indexes, report = [], [], [], []
    for i, desc in enumerate(layers):
        what = f"{src}{' ' + label if label else ''} layer {i + 1}/{len(layers)} ({desc.get('digest')})"
        digest, size = desc.get("digest", ""), int(desc.get("size", 0))
        annotations = dict(desc.get("annotations") or {})
        earlier = annotations.pop(GZIP_INDEX_ANNOTATION, None)
        if earlier is not None and annotations.get(estargz.TOC_DIGEST_ANNOTATION) == earlier:
            del annotations[estargz.TOC_DIGEST_ANNOTATION]  # the index of an earlier run: written again
        # An OCI manifest with Docker layer media types cannot be pushed or saved by Podman: OCI's names
        # for the same bytes (the blob and its digest do not change).
        desc["mediaType"] = OCI_LAYER_FOR_DOCKER.get(desc.get("mediaType"), desc.get("mediaType"))
        if desc["mediaType"] != OCI_LAYER_GZIP or estargz.TOC_DIGEST_ANNOTATION in annotations:
            why = "eStargz already" if desc["mediaType"] == OCI_LAYER_GZIP else "not gzip"
            progress.message(f"{what}: kept as it is ({why})")
            report.append(IndexedLayer(digest, size, note=why))
            blobs.append((digest, size, None))
        else:
            path, index = _index_layer(src, digest, size, options, progress, work, what)
            index_digest = sha256_digest(index)
            # Both keys, the same digest: Podman >= 5.1 asks the store by the first; the store serves
            # the layer as indexed only when the second, ours, agrees (docs/gzindex.md).
            annotations[estargz.TOC_DIGEST_ANNOTATION] = index_digest
            annotations[GZIP_INDEX_ANNOTATION] = index_digest
            report.append(IndexedLayer(digest, size, index_digest, len(index)))
            blobs.append((digest, size, path))
            indexes.append(index)
        if annotations:
            desc["annotations"] = annotations
        descriptors.append(desc)
    out = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": OCI_CONFIG, "digest": config_ref[0], "size": config_ref[1]},
           "layers": descriptors}
    if isinstance(doc.get("annotations"), dict) and doc["annotations"]:
        out["annotations"] = doc["annotations"]
    subject = Descriptor(doc.get("mediaType") or media_type or OCI_MANIFEST, sha256_digest(manifest), len(manifest))
    return _Image(json.dumps(out, separators=(",", ":")).encode(), config_ref, blobs, indexes, report, platform,
                  subject)


def index_descriptors(indexes: list[tuple[str, bytes]]) -> list[Descriptor]:
    """The layers of a gzip-index referrer: each (layer blob digest, index blob), annotated with the layer."""
    return [Descriptor(gzindex.MEDIA_TYPE, sha256_digest(blob), len(blob),
                       annotations={GZIP_INDEX_LAYER_ANNOTATION: layer}) for layer, blob in indexes]


def _publish_referrer(src, image: _Image, progress: Progress) -> str:
    """Publish ``image``'s indexes as a referrer of its SRC manifest; what became of it, in words.

    A failure is a warning, not an error: DST is stored and serves lazily
    without it; only engines that ask by blob digest miss it, for SRC.
    """
    indexed = [layer.digest for layer in image.report if layer.index_digest]
    if not indexed or image.subject is None:
        return "no index to publish"
    if not isinstance(src, RegistryImage):
        return "not published: SRC is not in a registry"
    layers = index_descriptors(list(zip(indexed, image.indexes)))
    try:
        for blob in image.indexes:  # the referrer's layers live in SRC's repository
            src.push_blob(io.BytesIO(blob), sha256_digest(blob), len(blob))
        published = src.client.publish_referrer(src.ref, image.subject, GZIP_INDEX_ARTIFACT_TYPE, layers)
    except (ALSError, TransportError) as e:
        progress.message(f"warning: the indexes were not published as a referrer of {src}@"
                         f"{image.subject.digest}: {e}")
        log.warning("gzip index referrer of %s@%s not published: %s", src.ref.name, image.subject.digest, e)
        return f"not published: {e}"
    how = "referrers API" if published.tag is None else f"fallback tag {published.tag}"
    progress.message(f"published the indexes as referrer {published.descriptor.digest} of "
                     f"{src.ref.name}@{image.subject.digest} ({how})")
    return f"published {published.descriptor.digest} ({how})"


def _index_layer(src, digest: str, size: int, options: IndexOptions, progress: Progress, work: Path,
                 what: str) -> tuple[Path, bytes]:
    """Download one layer (verified) into ``work`` and write its index; (the file, the index blob)."""
    path = work / f"layer-{digest.replace(':', '-')}"
    progress.start(f"{what}: reading", size)
    t0 = time.monotonic()
    try:
        n = 0
        with src.open_blob(digest) as stream, open(path, "wb") as out:
            while piece := stream.read(_PIECE):
                out.write(piece)
                n += len(piece)
                progress.advance(len(piece))
        if n != size:
            raise FormatError(f"blob is {n} bytes, the manifest says {size}")
        progress.finish()
        progress.start(f"{what}: indexing", size)
        index = gzindex_writer.write_index(str(path), layer_digest=digest, layer_size=size,
                                           span_size=options.span_size, progress=progress.advance)
    except (ALSError, OSError) as e:
        progress.finish("failed")
        raise ConvertError(f"{what}: {e}") from None
    progress.finish(f"index {len(index) / 1024:.0f} KiB ({100 * len(index) / max(size, 1):.2f}%)")
    log.info("%s: indexed in %.1fs: %d bytes (%.2f%% of the layer)", what, time.monotonic() - t0, len(index),
             100 * len(index) / max(size, 1))
    return path, index


# ---- storing ------------------------------------------------------------------------------

def _place_blob(src, dst, digest: str, size: int, path: Path | None, progress: Progress, work: Path) -> str:
    """Make ``dst``'s repository hold a layer or config blob of ``src``: how it got there."""
    if dst.has_blob(digest):
        return "there already"
    if isinstance(src, RegistryImage) and isinstance(dst, RegistryImage):
        try:
            if dst.client.mount_blob(dst.ref, digest, src.ref):
                return "mounted"
        except ALSError as e:  # a registry without mounts, or without the right to read SRC: copy
            log.info("mounting %s into %s failed (%s); copying it", digest, dst, e)
    progress.message(f"copying {digest} ({size / (1 << 20):.1f} MiB) to {dst}")
    try:
        if path is not None:
            with open(path, "rb") as f:
                dst.push_blob(f, digest, size)
        else:  # through a temporary file: push_blob may read it twice (a retry, a 401)
            with src.open_blob(digest) as stream, tempfile.TemporaryFile(dir=work) as f:
                shutil.copyfileobj(stream, f, _PIECE)
                f.seek(0)
                dst.push_blob(f, digest, size)
    except TransportError as e:
        raise ConvertError(f"{dst}: {e}") from None
    return "copied"


def _store(src, dst, images: list[_Image], index: dict | None, progress: Progress, work: Path) -> IndexResult:
    """Index blobs and layer and config blobs, then the manifests; the tagged one last."""
    for image in images:
        for blob in image.indexes:
            dst.push_blob(io.BytesIO(blob), sha256_digest(blob), len(blob))
        for (digest, size, path), layer in zip(image.layers, image.report):
            how = _place_blob(src, dst, digest, size, path, progress, work)
            layer.note = f"{layer.note}, {how}" if layer.note else how
        _place_blob(src, dst, image.config[0], image.config[1], None, progress, work)
    digest, media_type = put_manifests(dst, [(image.manifest, image.platform) for image in images], index, True)
    return IndexResult(digest, media_type, [image.report for image in images])
