"""Assembling OCI images from layer tars and pushing them.

The demo, the tests and (later) `als convert` all need to turn tar streams
into an eStargz image in a registry; this is the one place that knows how a
config, a manifest and the layer annotations fit together.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tempfile
from dataclasses import dataclass, field
from typing import BinaryIO

from als.formats import estargz_writer
from als.oci import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST
from als.reference import Reference
from als.registry.client import RegistryClient




@dataclass
class BuiltLayer:
    """A layer blob on disk (a spooled temp file) with what the manifest and config say of it."""

    blob: BinaryIO
    digest: str
    size: int
    diff_id: str
    annotations: dict[str, str] = field(default_factory=dict)
    media_type: str = OCI_LAYER_GZIP

    def descriptor(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = self.annotations
        return d


def estargz_layer(tar: BinaryIO, *, chunk_size: int = 4 << 20, level: int = 9,
                  prioritized: list[str] | None = None) -> BuiltLayer:
    """Convert a tar stream into an eStargz layer blob, with the annotations lazy pulling needs."""
    out = tempfile.SpooledTemporaryFile(max_size=32 << 20)
    r = estargz_writer.write_estargz(tar, out, chunk_size=chunk_size, level=level, prioritized=prioritized)
    out.seek(0)
    return BuiltLayer(blob=out, digest=r.blob_digest, size=r.compressed_size, diff_id=r.diff_id,
                      annotations=r.annotations())


def gzip_layer(tar: bytes, level: int = 9) -> BuiltLayer:
    """A plain gzip layer (not lazily servable), for comparisons and fallbacks."""
    blob = gzip.compress(tar, compresslevel=level, mtime=0)
    return BuiltLayer(blob=io.BytesIO(blob), digest="sha256:" + hashlib.sha256(blob).hexdigest(),
                      size=len(blob), diff_id="sha256:" + hashlib.sha256(tar).hexdigest())


def image_config(layers: list[BuiltLayer], *, cmd: list[str] | None = None, arch: str = "amd64") -> bytes:
    config = {
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": cmd or ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
        "history": [{"created_by": "als"} for _ in layers],
    }
    return json.dumps(config, sort_keys=True).encode()


def push_image(client: RegistryClient, ref: Reference, layers: list[BuiltLayer],
               config: bytes | None = None) -> str:
    """Push blobs, config and an OCI manifest; return the manifest digest."""
    config = config or image_config(layers)
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    for l in layers:
        l.blob.seek(0)
        client.push_blob(ref, l.blob, l.digest, l.size)
    client.push_blob(ref, config, config_digest, len(config))
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [l.descriptor() for l in layers],
    }).encode()
    client.put_manifest(ref, manifest, OCI_MANIFEST)
    return "sha256:" + hashlib.sha256(manifest).hexdigest()
