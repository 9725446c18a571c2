"""The OCI and Docker image formats' media types, and the one way their JSON documents are read.

Manifests, indexes and configs come from registries and OCI layouts that the
store does not trust: each must be a JSON object, and a failure names the
document and the error class the caller wants.
"""

from __future__ import annotations

import json

from als.errors import FormatError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"  # the empty descriptor's media type (image-spec 1.1)
OCI_EMPTY_DATA = b"{}"  # the one blob of that type
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)  # Accept order
GZIP_LAYER_TYPES = frozenset({OCI_LAYER_GZIP, DOCKER_LAYER_GZIP})

# The layer annotation naming (by digest) the seekable index of an ordinary gzip layer, a blob in the
# same repository (`als index` writes it, `als serve` reads it: als/formats/gzindex.py). `als index` puts
# the same digest under the eStargz TOC key too (formats/estargz.TOC_DIGEST_ANNOTATION): Podman >= 5.1
# asks an additional layer store only about layers with a TOC annotation, and of the two it reads, that
# key is the one that degrades to an ordinary pull wherever the store declines (docs/gzindex.md). Ours
# says that this "TOC" is a gzip index, and must agree with it.
GZIP_INDEX_ANNOTATION = "io.github.als.gzip-index.digest"
# A referrer of an image manifest that carries gzip indexes of its layers (`als index`): its artifact
# type, and the annotation of each of its layers (an index blob) naming the layer blob it indexes.
GZIP_INDEX_ARTIFACT_TYPE = "application/vnd.als.gzip-index.v1"
GZIP_INDEX_LAYER_ANNOTATION = "io.github.als.gzip-index.layer"
# Docker layer media types as OCI names the same bytes: an OCI manifest must not mix them (Podman's
# push and save of it fail, "unsupported MIME type for compression").
OCI_LAYER_FOR_DOCKER = {
    DOCKER_LAYER_GZIP: OCI_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar": "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip":
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
}
ZSTD_LAYER_TYPES = frozenset({OCI_LAYER_ZSTD})


def json_object(data: bytes, what: str, error: type[Exception] = FormatError) -> dict:
    """Parse a manifest, index or config, which must be a JSON object; ``error`` names the failure."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise error(f"{what} is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise error(f"{what} is not a JSON object")
    return doc
