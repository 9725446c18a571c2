"""A layer as its image's manifest describes it, and once resolved: what the store serves.

The descriptor is the manifest's word (digest, size, media type, annotations,
and the DiffID the config pairs with it); the resolved layer adds what the
store built from the layer's table of contents: its tree, the blob source its
chunks are read from, and the `info` file containers/storage reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from als.fetch.front import FrontRead
from als.fetch.source import BlobSource
from als.formats import lazy
from als.formats import toc as T
from als.layer.view import LayerView


@dataclass(frozen=True)
class LayerDescriptor:
    index: int
    digest: str
    size: int
    media_type: str
    annotations: dict
    diff_id: str

    @property
    def toc_digest(self) -> str:
        """The eStargz TOC digest, the zstd:chunked manifest checksum (either annotation spelling), or the
        digest of a gzip layer's index."""
        return lazy.toc_digest(self.annotations)



@dataclass
class Layer:
    """A resolved layer that the store serves lazily."""

    ref: str
    desc: LayerDescriptor
    toc_digest: str
    diff_size: int
    view: LayerView
    source: BlobSource
    prefetch: list[T.Chunk] = field(default_factory=list)  # fetched as soon as the layer resolves
    # The prefetch's first bytes, read from the blob's start as soon as its TOC said where the prefetch
    # ends (before the tree was built): the prefetch takes them (``Warmer``) instead of fetching them.
    front: FrontRead | None = None
    layer_id: int = 0  # the high half of its inode numbers; a rebuild after eviction keeps it

    def info(self, key: str) -> bytes:
        """The `info` JSON for the digest Podman used to name the layer."""
        # Every source's compression comes from a TOC one of the formats parsed.
        compression = (lazy.for_compression(self.source.compression) or lazy.ESTARGZ).storage_compression
        if key == self.desc.digest:
            body = {"compressed-diff-digest": self.desc.digest, "compressed-size": self.desc.size,
                    "diff-digest": self.desc.diff_id, "diff-size": self.diff_size,
                    "compression": compression}
        else:  # named by TOC digest: Podman >= 5.1 keeps TOC-trusted layers apart from DiffID ones
            body = {"toc-digest": self.toc_digest, "compressed-size": self.desc.size,
                    "diff-size": self.diff_size, "compression": compression,
                    "flags": {"expected-layer-diffid": self.desc.diff_id}}
        return (json.dumps(body) + "\n").encode()
