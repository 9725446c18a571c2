"""The store's own decisions over an in-memory registry, counted request by request: no registry process.

What it asks the registry for (once per image, only the chunks a read needs),
what it keeps in the state directory and serves from there when the registry
is away, and which layers it declines. Files are read through its file system
(tests/support/memstore.py), as the kernel would.
"""

from __future__ import annotations

import errno
import json
import logging
import random

import pytest

from als.errors import ALSError
from tests.support import images, memstore
from tests.support.memregistry import BLOB, MANIFEST, RANGE, MemoryRegistry

REF = "registry.test/als/files:1"
# 300 KB each, incompressible: a layer of three is bigger than the tail the store reads to find its TOC
FILES = {f"f{i}": random.Random(i).randbytes(300_000) for i in range(6)}


def files_layer(names, chunk_size: int = 64 << 10):
    return memstore.estargz([images.Entry(n, data=FILES[n]) for n in names], chunk_size=chunk_size)


@pytest.fixture
def two_layers(mem):
    layers = [files_layer(["f0", "f1", "f2"]), files_layer(["f3", "f4", "f5"])]
    memstore.push(mem.registry, REF, layers)
    return layers


def test_an_image_is_resolved_once_for_all_its_lookups(mem, two_layers):
    for _ in range(3):
        for layer in two_layers:
            assert mem.read_all(mem.layer(REF, layer.digest, "diff", "f0" if layer is two_layers[0] else "f3"))
    assert len(mem.registry.served(MANIFEST)) == 1
    assert len(mem.registry.served(BLOB)) == 1  # the config
    assert mem.store.refs() == [REF]
    assert sorted(l.desc.digest for l in mem.store.layers()) == sorted(l.digest for l in two_layers)


def test_a_read_fetches_its_file_not_the_layer(mem, two_layers):
    layer = two_layers[0]
    node = mem.layer(REF, layer.digest, "diff", "f1")
    resolved = mem.registry.bytes_served
    assert mem.read(node, 0, 10) == FILES["f1"][:10]
    fetched = mem.registry.bytes_served - resolved
    assert 0 < fetched < 2 * (64 << 10), (fetched, layer.size)  # its first chunk, not the file or layer
    assert mem.read_all(node) == FILES["f1"]
    again = mem.registry.bytes_served
    assert mem.read_all(node) == FILES["f1"]
    assert mem.registry.bytes_served == again  # its chunks are cached: no second request


def test_both_names_of_a_layer_are_one_layer_with_an_info_each(mem, two_layers):
    layer = two_layers[1]
    toc = layer.annotations["containerd.io/snapshot/stargz/toc.digest"]
    by_toc, by_blob = mem.store.layer(REF, toc), mem.store.layer(REF, layer.digest)
    assert by_blob is by_toc
    assert json.loads(by_blob.info(layer.digest))["compressed-diff-digest"] == layer.digest
    assert json.loads(by_blob.info(toc))["toc-digest"] == toc


def test_an_unknown_image_or_layer_is_enoent_and_a_declined_one_eio(mem, two_layers):
    with pytest.raises(ALSError) as e:
        mem.store.layer("registry.test/als/absent:1", two_layers[0].digest)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(ALSError) as e:
        mem.store.layer(REF, "sha256:" + "0" * 64)
    assert e.value.errno == errno.ENOENT
    plain = memstore.plain_gzip([images.Entry("x", data=b"x")])
    memstore.push(mem.registry, "registry.test/als/plain:1", [plain])
    with pytest.raises(ALSError) as e:
        mem.store.layer("registry.test/als/plain:1", plain.digest)
    assert e.value.errno == errno.EIO


def test_a_manifest_failure_is_eio_and_kept_for_failure_ttl_not_asked_again_per_lookup(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="als.store")
    config = memstore.QUIET + "[resolve]\nfailure_ttl = 3600\n"  # no second resolution within the test
    with memstore.harness(tmp_path, config) as h:
        layer = files_layer(["f0"])
        memstore.push(h.registry, REF, [layer])
        h.registry.fail(MANIFEST)
        for _ in range(3):
            with pytest.raises(OSError) as e:
                h.layer(REF, layer.digest)
            assert e.value.errno == errno.EIO
        assert f"image {REF}: cannot resolve: the in-memory registry failed on purpose" in caplog.text
        assert len(h.registry.served(MANIFEST)) == 1


def test_an_evicted_layer_comes_back_from_saved_metadata_without_the_registry(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="als.store")
    config = memstore.QUIET + "[resolve]\nmax_idle_layers = 1\n"
    with memstore.harness(tmp_path, config) as h:
        layers = [files_layer(["f0", "f1"]), files_layer(["f2", "f3"])]
        memstore.push(h.registry, REF, layers)
        first = h.store.layer(REF, layers[0].digest)
        h.store.layer(REF, layers[1].digest)  # one unused layer is kept: the first goes
        assert [l.desc.digest for l in h.store.layers()] == [layers[1].digest]
        assert f"image {REF} layer {layers[0].digest}: dropped from memory" in caplog.text
        tocs = len(h.registry.served(RANGE))
        again = h.store.layer(REF, layers[0].digest)
        assert again is not first and again.layer_id == first.layer_id  # same inode numbers
        assert len(h.registry.served(RANGE)) == tocs  # its TOC came from the state directory
        assert h.read_all(h.layer(REF, layers[0].digest, "diff", "f1")) == FILES["f1"]


def test_a_restarted_store_serves_from_its_state_and_cache_when_the_registry_is_away(tmp_path, caplog):
    registry = MemoryRegistry()
    layer = files_layer(["f0", "f1", "f2"])
    memstore.push(registry, REF, [layer])
    with memstore.harness(tmp_path, registry=registry) as h:
        assert h.read(h.layer(REF, layer.digest, "diff", "f0"), 0, 10) == FILES["f0"][:10]
        h.cache.flush()
    caplog.set_level(logging.WARNING, logger="als.store")
    registry.fail(MANIFEST, times=100)
    registry.fail(RANGE, times=100)
    with memstore.harness(tmp_path, registry=registry) as h:  # the same state and cache directories
        node = h.layer(REF, layer.digest, "diff", "f0")
        assert f"image {REF} layer {layer.digest}: serving it from saved metadata" in caplog.text
        assert h.read(node, 0, 10) == FILES["f0"][:10]  # from the chunk cache
        with pytest.raises(OSError) as e:  # never read before, and the registry fails: EIO
            h.read(h.layer(REF, layer.digest, "diff", "f1"), 0, 10)
        assert e.value.errno == errno.EIO
