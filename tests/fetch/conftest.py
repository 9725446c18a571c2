"""The layer the fetch tests read: pushed once per test module to the registry the tests share."""

from __future__ import annotations

import os
from functools import partial

import pytest

from als.fetch.source import BlobSource
from als.formats import estargz
from als.layer.view import LayerView
from als.reference import parse_reference
from tests.fetch.support import CHUNK
from tests.support import images


@pytest.fixture(scope="module")
def layer_source(registry, client):
    """A pushed layer of 20 files x 4 chunks of random bytes, and a way to make BlobSources for it."""
    files = {f"f{i:02d}": os.urandom(4 * CHUNK) for i in range(20)}
    layer = images.push_files(client, f"{registry.host}/fetch:1", files, chunk_size=CHUNK, level=1)
    ref = parse_reference(f"{registry.host}/fetch:1")
    layer.blob.seek(0)
    blob = layer.blob.read()
    toc_offset, footer = estargz.parse_footer(blob[-estargz.FOOTER_SIZE:], len(blob))
    toc = estargz.parse_toc(blob[toc_offset:len(blob) - footer], None, toc_offset=toc_offset)
    view = LayerView(toc.entries)

    def make(piece: int = 0) -> BlobSource:
        """A source that streams its ranges as the store's do; ``piece``: re-cut the body into pieces this big."""
        stream = partial(client.stream_range, ref, layer.digest)
        if piece:
            def stream(start, end, sink, inner=stream):
                return inner(start, end, lambda data: [sink(data[i:i + piece]) for i in range(0, len(data), piece)])
        return BlobSource("test layer", partial(client.read_range, ref, layer.digest), toc.compression,
                          view.chunks(), stream_range=stream)

    return make, view, files, layer
