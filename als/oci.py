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
# same repository (`als index` writes it, `als serve` reads it: als/formats/gzindex.py). One place, so
# that the key Podman and other clients degrade best with can be chosen here alone.
GZIP_INDEX_ANNOTATION = "io.github.als.gzip-index.digest"
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
