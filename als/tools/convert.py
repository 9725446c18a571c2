"""`als convert`: turn an image's layers into eStargz (or zstd:chunked) and push the result.

Why this shape: a conversion must never leave a half-written image under the
destination, and must not need memory in proportion to a layer. So every
layer is streamed (registry or layout → decompressor → tar reader → writer →
temporary file) and only once *every* layer of *every* platform has converted
do the pushes start: blobs first, then configs, then manifests, the tagged
manifest (or index) last. A missing blob, a layer that is not a tar, or a
media type we cannot read fails the command before anything is pushed.

The config keeps everything (history, labels, environment...) except
``rootfs.diff_ids``, which name the new uncompressed streams; the manifest is
OCI, with the annotations lazy pulling needs on every layer.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Sequence, TypeVar

import zstandard

from als.digest import sha256_digest
from als.errors import ALSError, FormatError
from als.formats import estargz, estargz_writer, zstdchunked, zstdchunked_writer
from als.oci import (GZIP_LAYER_TYPES, IMAGE_TYPES, INDEX_TYPES, OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST,
                     ZSTD_LAYER_TYPES, json_object)
from als.tools.progress import Progress
from als.tools.transport import ImageTransport, TransportError

log = logging.getLogger("als.convert")

TAR_TYPES = {"application/vnd.oci.image.layer.v1.tar", "application/vnd.docker.image.rootfs.diff.tar"}
ATTESTATION_ANNOTATION = "vnd.docker.reference.type"
MAX_CONFIG = 8 << 20
_PIECE = 1 << 20
T = TypeVar("T")


class ConvertError(ALSError):
    """The source image cannot be converted; nothing was pushed."""


@dataclass
class ConvertOptions:
    chunk_size: int = 4 << 20
    compression_level: int | None = None  # None: 9 for gzip (eStargz), 3 for zstd
    prioritized: Sequence[str] | None = None
    zstd_chunked: bool = False
    platform: str = ""  # "os/arch[/variant]": convert only this one from an index
    reconvert: bool = False  # also convert layers that already are in the target format

    @property
    def level(self) -> int:
        if self.compression_level is not None:
            return self.compression_level
        return 3 if self.zstd_chunked else 9


@dataclass
class _Blob:
    """A blob ready to push: on disk (converted or copied) or already at the destination."""

    digest: str
    size: int
    path: Path | None = None


@dataclass
class LayerReport:
    source_digest: str
    digest: str
    size: int
    kept: bool


@dataclass
class _Image:
    """One converted platform image, before anything is pushed."""

    config: bytes
    manifest: bytes
    layers: list[_Blob]
    report: list[LayerReport]
    platform: dict | None = None


@dataclass
class ConvertResult:
    digest: str  # of the pushed manifest or index
    media_type: str
    images: list[list[LayerReport]] = field(default_factory=list)


def convert(src: ImageTransport, dst: ImageTransport, options: ConvertOptions,
            progress: Progress | None = None, workdir: str | Path | None = None,
            tagged: bool = True) -> ConvertResult:
    """Convert the image at ``src`` and store it at ``dst``; nothing is stored unless all of it converted.

    ``tagged=False`` stores the result by digest only (`als optimize`'s intermediate image).
    """
    progress = progress or Progress(enabled=False)
    if options.chunk_size <= 0:
        raise ConvertError(f"chunk size must be positive, not {options.chunk_size}")
    with tempfile.TemporaryDirectory(prefix="als-convert-", dir=workdir) as tmp:
        work = Path(tmp)
        images, index = each_image(src, options.platform, lambda manifest, media_type, label, platform:
                                   _convert_image(src, dst, manifest, media_type, options, progress, work, label,
                                                  platform))
        return _push(dst, images, index, progress, tagged)


def each_image(src, platform: str, make: Callable[[bytes, str, str, dict | None], T]) -> tuple[list[T], dict | None]:
    """``make(manifest, media_type, label, platform)`` for ``src``'s image, or for each platform image of its
    index (only ``platform``'s, if given); and the index whose annotations a new index keeps, or None
    (the result is one image)."""
    top = src.get_manifest()
    doc = json_object(top.data, f"manifest of {src}", ConvertError)
    if top.media_type in INDEX_TYPES or "manifests" in doc:
        images = []
        for entry in platform_entries(doc, platform, src):
            m = src.get_manifest(entry["digest"])
            label = f"platform {platform_name(entry.get('platform'))}"
            images.append(make(m.data, m.media_type, label, entry.get("platform")))
        return images, None if platform else doc
    if platform:
        check_platform(src, top.data, platform)
    return [make(top.data, top.media_type, "", None)], None


# ---- selection ---------------------------------------------------------------------------

def platform_name(p: dict | None) -> str:
    if not p:
        return "unknown"
    return "/".join(x for x in (p.get("os", ""), p.get("architecture", ""), p.get("variant", "")) if x)


def _matches(p: dict | None, want: str) -> bool:
    parts = want.split("/")
    if not p or len(parts) < 2:
        return False
    if (p.get("os"), p.get("architecture")) != (parts[0], parts[1]):
        return False
    return len(parts) < 3 or p.get("variant", "") == parts[2]


def platform_entries(index: dict, platform: str, src) -> list[dict]:
    entries = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
    # Attestations (buildx provenance) describe an image; they are not one.
    entries = [m for m in entries if (m.get("annotations") or {}).get(ATTESTATION_ANNOTATION) != "attestation-manifest"]
    if platform:
        chosen = [m for m in entries if _matches(m.get("platform"), platform)]
        if not chosen:
            have = ", ".join(platform_name(m.get("platform")) for m in entries) or "none"
            raise ConvertError(f"{src} has no image for platform {platform} (it has: {have})")
        return chosen[:1]
    if not entries:
        raise ConvertError(f"{src} is an index with no images")
    return entries


def check_platform(src, manifest: bytes, platform: str) -> None:
    """A single-image source is accepted for --platform only if its config says that platform."""
    # The config is read again by the conversion; reading it twice is cheap next to the layers.
    doc = json_object(manifest, f"manifest of {src}", ConvertError)
    try:
        config = json_object(src.get_blob(doc["config"]["digest"], MAX_CONFIG), f"config of {src}",
                             ConvertError)
    except (KeyError, TypeError):
        raise ConvertError(f"manifest of {src} names no config") from None
    p = {"os": config.get("os"), "architecture": config.get("architecture"), "variant": config.get("variant", "")}
    if not _matches(p, platform):
        raise ConvertError(f"{src} is for {platform_name(p)}, not {platform}")


# ---- one platform image ------------------------------------------------------------------

def _convert_image(src, dst, manifest: bytes, media_type: str, options: ConvertOptions, progress: Progress,
                   work: Path, label: str, platform: dict | None) -> _Image:
    doc = json_object(manifest, f"manifest of {src}", ConvertError)
    if media_type and media_type not in IMAGE_TYPES and doc.get("mediaType") not in IMAGE_TYPES:
        raise ConvertError(f"{src}: manifest media type {media_type} is not an image manifest")
    try:
        config_digest = doc["config"]["digest"]
        layers = list(doc["layers"])
    except (KeyError, TypeError):
        raise ConvertError(f"manifest of {src} has no config or layers") from None
    config = json_object(src.get_blob(config_digest, MAX_CONFIG), f"config {config_digest} of {src}",
                         ConvertError)
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or len(rootfs.get("diff_ids") or []) != len(layers):
        raise ConvertError(f"config of {src} lists {len(rootfs.get('diff_ids') or []) if isinstance(rootfs, dict) else 0} "
                           f"diff_ids for {len(layers)} layers")
    descriptors, blobs, report, diff_ids = [], [], [], []
    for i, desc in enumerate(layers):
        what = f"{src}{' ' + label if label else ''} layer {i + 1}/{len(layers)} ({desc.get('digest')})"
        if _keep(desc, options):
            blob = _copy_blob(src, dst, desc, work, progress, what)
            kept = {k: desc[k] for k in ("mediaType", "digest", "size", "annotations") if k in desc}
            if options.zstd_chunked:  # the blob stays; its manifest entry gains the names Podman >= 5.1 reads
                kept["annotations"] = zstdchunked.with_current_names(kept["annotations"])
            descriptors.append(kept)
            diff_ids.append(rootfs["diff_ids"][i])
            report.append(LayerReport(desc["digest"], desc["digest"], int(desc["size"]), kept=True))
        else:
            blob, descriptor, diff_id = _convert_layer(src, desc, options, work, progress, what)
            descriptors.append(descriptor)
            diff_ids.append(diff_id)
            report.append(LayerReport(desc.get("digest", ""), blob.digest, blob.size, kept=False))
        blobs.append(blob)
    rootfs["diff_ids"] = diff_ids
    config_bytes = json.dumps(config, separators=(",", ":")).encode()
    out = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config_bytes), "size": len(config_bytes)},
           "layers": descriptors}
    if isinstance(doc.get("annotations"), dict) and doc["annotations"]:
        out["annotations"] = doc["annotations"]
    return _Image(config=config_bytes, manifest=json.dumps(out, separators=(",", ":")).encode(),
                  layers=blobs, report=report, platform=platform)


def _keep(desc: dict, options: ConvertOptions) -> bool:
    """A layer already in the target format (with what lazy pulling needs) is kept unless --reconvert."""
    if options.reconvert:
        return False
    ann = desc.get("annotations") or {}
    if options.zstd_chunked:
        return desc.get("mediaType") in ZSTD_LAYER_TYPES and any(k in ann for k in zstdchunked.CHECKSUM_ANNOTATIONS)
    return (desc.get("mediaType") in GZIP_LAYER_TYPES and estargz.TOC_DIGEST_ANNOTATION in ann
            and estargz.UNCOMPRESSED_SIZE_ANNOTATION in ann)


def _copy_blob(src, dst, desc: dict, work: Path, progress: Progress, what: str) -> _Blob:
    digest, size = desc.get("digest", ""), int(desc.get("size", 0))
    if dst.has_blob(digest):
        progress.message(f"{what}: kept (already at the destination)")
        return _Blob(digest, size)
    path = work / f"kept-{digest.replace(':', '-')}"
    progress.start(f"{what}: copying", size)
    try:
        with src.open_blob(digest) as stream, open(path, "wb") as out:
            n = 0
            while piece := stream.read(_PIECE):
                out.write(piece)
                n += len(piece)
                progress.advance(len(piece))
    except (FormatError, TransportError) as e:
        raise ConvertError(f"{what}: {e}") from None
    progress.finish("kept as it is")
    if n != size:
        raise ConvertError(f"{what}: blob is {n} bytes, the manifest says {size}")
    return _Blob(digest, size, path)


class _Counting:
    """Counts bytes read from the source blob, for the progress line."""

    def __init__(self, raw: BinaryIO, progress: Progress):
        self.raw, self.progress = raw, progress

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.progress.advance(len(data))
        return data


def _decompressed(stream, media_type: str):
    if media_type in GZIP_LAYER_TYPES:
        return gzip.GzipFile(fileobj=stream, mode="rb")  # reads multi-member (eStargz) streams too
    if media_type in ZSTD_LAYER_TYPES:
        return zstandard.ZstdDecompressor(max_window_size=zstdchunked.MAX_WINDOW).stream_reader(
            stream, read_across_frames=True)
    return stream


def _convert_layer(src, desc: dict, options: ConvertOptions, work: Path, progress: Progress,
                   what: str) -> tuple[_Blob, dict, str]:
    media_type = desc.get("mediaType", "")
    if media_type not in GZIP_LAYER_TYPES | ZSTD_LAYER_TYPES | TAR_TYPES:
        raise ConvertError(f"{what}: media type {media_type or '(none)'} is not a layer als convert can read "
                           "(gzip, zstd or uncompressed tar)")
    digest = desc.get("digest", "")
    fd, name = tempfile.mkstemp(dir=work, prefix="layer-")
    os.close(fd)
    path = Path(name)
    progress.start(f"{what}: converting", int(desc.get("size", 0)))
    try:
        with src.open_blob(digest) as raw, open(path, "wb") as out:
            counting = _Counting(raw, progress)
            tar = _decompressed(counting, media_type)
            if options.zstd_chunked:
                r = zstdchunked_writer.write_zstdchunked(tar, out, chunk_size=options.chunk_size, level=options.level,
                                                  prioritized=options.prioritized)
                annotations = r.annotations()
                out_type = zstdchunked.MEDIA_TYPE
            else:
                r = estargz_writer.write_estargz(tar, out, chunk_size=options.chunk_size, level=options.level,
                                          prioritized=options.prioritized)
                annotations = r.annotations()
                out_type = OCI_LAYER_GZIP
            # Read the source to its very end: that is when its digest is checked.
            while counting.read(_PIECE):
                pass
    except (FormatError, TransportError) as e:
        progress.finish("failed")
        raise ConvertError(f"{what}: {e}") from None
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        progress.finish("failed")
        raise ConvertError(f"{what}: not a readable {_kind(media_type)} tar stream: {e}") from None
    except ValueError as e:  # a bad chunk size or compression level
        progress.finish("failed")
        raise ConvertError(f"{what}: {e}") from None
    progress.finish(f"-> {r.compressed_size / (1 << 20):.1f} MiB {'zstd:chunked' if options.zstd_chunked else 'eStargz'}")
    log.info("%s: converted to %s (%d bytes)", what, r.blob_digest, r.compressed_size)
    descriptor = {"mediaType": out_type, "digest": r.blob_digest, "size": r.compressed_size,
                  "annotations": annotations}
    return _Blob(r.blob_digest, r.compressed_size, path), descriptor, r.diff_id


def _kind(media_type: str) -> str:
    return "gzip" if media_type in GZIP_LAYER_TYPES else "zstd" if media_type in ZSTD_LAYER_TYPES else "plain"


# ---- pushing -----------------------------------------------------------------------------

def _push(dst, images: list[_Image], index: dict | None, progress: Progress, tagged: bool) -> ConvertResult:
    """Blobs, then configs, then manifests; the tagged manifest or index goes last."""
    pushed: set[str] = set()
    for image in images:
        for blob in image.layers:
            if blob.path is None or blob.digest in pushed:
                continue
            progress.message(f"pushing {blob.digest} ({blob.size / (1 << 20):.1f} MiB) to {dst}")
            with open(blob.path, "rb") as f:
                dst.push_blob(f, blob.digest, blob.size)
            pushed.add(blob.digest)
        cdigest = sha256_digest(image.config)
        if cdigest not in pushed:
            dst.push_blob(_bytes_file(image.config), cdigest, len(image.config))
            pushed.add(cdigest)
    digest, media_type = put_manifests(dst, [(image.manifest, image.platform) for image in images], index, tagged)
    return ConvertResult(digest=digest, media_type=media_type, images=[image.report for image in images])


def put_manifests(dst, manifests: list[tuple[bytes, dict | None]], index: dict | None,
                  tagged: bool) -> tuple[str, str]:
    """Store image manifests (with their platforms) at ``dst``: the one alone, or all under a new index
    that keeps ``index``'s annotations; the tagged document goes last. Returns its digest and media type."""
    if index is None:
        return dst.put_manifest(manifests[0][0], OCI_MANIFEST, tagged=tagged), OCI_MANIFEST
    entries = []
    for manifest, platform in manifests:
        d = dst.put_manifest(manifest, OCI_MANIFEST, tagged=False)
        entry = {"mediaType": OCI_MANIFEST, "digest": d, "size": len(manifest)}
        if platform:
            entry["platform"] = platform
        entries.append(entry)
    out = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    if isinstance(index.get("annotations"), dict) and index["annotations"]:
        out["annotations"] = index["annotations"]
    return dst.put_manifest(json.dumps(out, separators=(",", ":")).encode(), OCI_INDEX, tagged=tagged), OCI_INDEX


def _bytes_file(data: bytes) -> BinaryIO:
    return io.BytesIO(data)


