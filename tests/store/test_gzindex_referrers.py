"""A plain gzip image served through the gzip indexes a referrer of its manifest names (Podman 4.x asks by blob digest).

The image is what any tool pushes: gzip layers with no annotation. `als
index` publishes, beside its manifest, a referrer whose layers are the index
blobs, each naming the layer it indexes (``als.tools.index.index_descriptors``
builds them here too). The store lists the referrers once per resolution,
only for layers without a TOC, and declines (never fails the image) when
there are none, the registry cannot say, or the index does not check out.
"""

from __future__ import annotations

import errno
import json
import logging

import pytest

from als.errors import ALSError, RegistryError
from als.formats import gzindex_writer
from als.oci import GZIP_INDEX_ARTIFACT_TYPE, OCI_MANIFEST
from als.reference import parse_reference
from als.registry.referrers import Descriptor
from als.tools.index import index_descriptors
from tests.support import images, memstore
from tests.support.memregistry import BLOB, MANIFEST, RANGE, REFERRERS, MemoryRegistry, sha256

REF = "registry.test/als/plain:1"
SPAN = 64 << 10
ON = memstore.QUIET + "[resolve]\ngzip_index_referrers = true\n"  # off by default: see config/config.toml


@pytest.fixture
def mem(tmp_path):
    """The in-process store with the referrer path switched on."""
    with memstore.harness(tmp_path, ON) as h:
        yield h


def _layers():
    a = [images.Entry("etc", images.DIR, 0o755), images.Entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
         images.Entry("etc/big", data=bytes(range(256)) * 1000)]
    b = [images.Entry("app", images.DIR, 0o755), images.Entry("app/hello.txt", data=b"hello from layer 2\n")]
    return [memstore.plain_gzip(a), memstore.plain_gzip(b)]


def _index(layer, tmp_path, *, layer_digest: str | None = None) -> bytes:
    path = tmp_path / f"{layer.digest[7:19]}.gz"
    layer.blob.seek(0)
    path.write_bytes(layer.blob.read())
    return gzindex_writer.write_index(str(path), layer_digest=layer_digest or layer.digest, layer_size=layer.size,
                                      span_size=SPAN)


def push_plain(registry: MemoryRegistry, tmp_path, *, referrer=True, extra=()) -> tuple[list, str, list[bytes]]:
    """The plain image (and ``extra`` layers), and a referrer naming an index of each plain layer;
    (the layers, the manifest digest, the index blobs)."""
    layers = _layers()
    digest = memstore.push(registry, REF, [*layers, *extra])
    indexes = [_index(l, tmp_path) for l in layers]
    if referrer:
        publish(registry, digest, [(l.digest, i) for l, i in zip(layers, indexes)])
    return layers, digest, indexes


def publish(registry: MemoryRegistry, subject: str, pairs: list[tuple[str, bytes]]) -> None:
    ref = parse_reference(REF)
    for _, blob in pairs:
        registry.push_blob(ref, blob, sha256(blob), len(blob))
    manifest = registry.manifests[(ref.name, subject)][0]
    registry.publish_referrer(ref, Descriptor(OCI_MANIFEST, subject, len(manifest)), GZIP_INDEX_ARTIFACT_TYPE,
                              index_descriptors(pairs))


def _declined(mem, digest: str, caplog, words: str) -> None:
    with pytest.raises(ALSError) as e:
        mem.store.layer(REF, digest)
    assert e.value.errno == errno.EIO
    assert words in caplog.text, caplog.text[-2000:]


def test_a_plain_gzip_image_is_served_through_its_referrer(mem, tmp_path):
    layers, digest, indexes = push_plain(mem.registry, tmp_path)
    for layer in layers:  # Podman 4.x: by blob digest, with the DiffID a normal pull records
        info = json.loads(mem.read_all(mem.layer(REF, layer.digest, "info")))
        assert info["diff-digest"] == layer.diff_id and info["compressed-diff-digest"] == layer.digest
    assert mem.read_all(mem.layer(REF, layers[0].digest, "diff", "etc", "passwd")) == b"root:x:0:0::/root:/bin/sh\n"
    assert mem.read_all(mem.layer(REF, layers[0].digest, "diff", "etc", "big")) == bytes(range(256)) * 1000
    assert mem.read_all(mem.layer(REF, layers[1].digest, "diff", "app", "hello.txt")) == b"hello from layer 2\n"
    assert len(mem.registry.served(REFERRERS, digest)) == 1  # once for the image, not once a layer
    for index in indexes:
        assert len(mem.registry.served(BLOB, sha256(index))) == 1
    assert not [r for r in mem.registry.served(RANGE) if r.end - r.start >= layers[0].size]  # no whole layer


def test_without_a_referrer_the_layers_are_declined_after_one_listing(mem, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="als.store")
    layers, digest, _ = push_plain(mem.registry, tmp_path, referrer=False)
    for layer in layers:
        _declined(mem, layer.digest, caplog, "no referrer of its image names a gzip index of it")
    assert len(mem.registry.served(REFERRERS, digest)) == 1


def test_a_registry_error_listing_referrers_declines_those_layers_only(mem, tmp_path, caplog):
    """The image resolves, and its eStargz layer is served: only the plain layers are declined."""
    caplog.set_level(logging.WARNING, logger="als.store")
    esgz = memstore.estargz([images.Entry("opt", images.DIR, 0o755), images.Entry("opt/x", data=b"x\n")])
    mem.registry.fail(REFERRERS, times=10, error=RegistryError("registry answered 500"))
    layers, _, _ = push_plain(mem.registry, tmp_path, extra=[esgz])
    _declined(mem, layers[0].digest, caplog, "no referrer of its image names a gzip index of it")
    assert mem.read_all(mem.layer(REF, esgz.digest, "diff", "opt", "x")) == b"x\n"


def test_a_referrer_naming_an_index_of_another_layer_is_declined(mem, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="als.store")
    layers = _layers()
    digest = memstore.push(mem.registry, REF, layers)
    wrong = _index(layers[0], tmp_path)  # names layer 1, listed for layer 2
    publish(mem.registry, digest, [(layers[1].digest, wrong)])
    _declined(mem, layers[1].digest, caplog, "gzip index is for layer")


def test_a_bad_index_in_a_newer_referrer_does_not_hide_a_good_one(mem, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="als.store")
    layers, digest, indexes = push_plain(mem.registry, tmp_path)
    bad = _index(layers[1], tmp_path, layer_digest=layers[0].digest)  # claims layer 1, indexes layer 2's bytes
    publish(mem.registry, digest, [(layers[0].digest, bad)])
    assert mem.read_all(mem.layer(REF, layers[0].digest, "diff", "etc", "passwd")) == b"root:x:0:0::/root:/bin/sh\n"
    assert f"serving it through gzip index {sha256(indexes[0])}" in caplog.text


def test_layers_with_a_toc_never_list_referrers(mem):
    esgz = memstore.estargz([images.Entry("opt", images.DIR, 0o755), images.Entry("opt/x", data=b"x\n")])
    memstore.push(mem.registry, REF, [esgz])
    assert mem.read_all(mem.layer(REF, esgz.digest, "diff", "opt", "x")) == b"x\n"
    assert not mem.registry.served(REFERRERS)


def test_by_default_no_referrer_is_listed(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="als.store")
    with memstore.harness(tmp_path) as mem:  # the default
        layers, _, _ = push_plain(mem.registry, tmp_path)
        _declined(mem, layers[0].digest, caplog, "declined")
        assert not mem.registry.served(REFERRERS)


def test_a_restarted_store_finds_the_saved_referrer_with_the_registry_away(tmp_path, caplog):
    registry = MemoryRegistry()
    layers, _, _ = push_plain(registry, tmp_path)
    with memstore.harness(tmp_path, ON, registry=registry) as h:
        assert h.read_all(h.layer(REF, layers[0].digest, "diff", "etc", "passwd")).startswith(b"root:")
        h.cache.flush()
    for kind in (MANIFEST, BLOB, RANGE, REFERRERS):
        registry.fail(kind, times=100)
    with memstore.harness(tmp_path, ON, registry=registry) as h:  # the same state and cache directories
        assert h.read_all(h.layer(REF, layers[0].digest, "diff", "etc", "passwd")).startswith(b"root:")


def test_the_referrers_are_listed_beside_the_config_fetch(mem, tmp_path):
    """The listing starts as soon as the manifest is in, not after the config: one round trip less
    before the first layer is ready."""
    from tests.support.memstore import ref_dir

    layers, digest, _ = push_plain(mem.registry, tmp_path)
    config = json.loads(mem.registry.manifests[(parse_reference(REF).name, digest)][0])["config"]["digest"]
    hold = mem.registry.hold(BLOB, config)
    try:
        mem.walk(ref_dir(REF))  # starts resolving
        assert hold.arrived.wait(10)
        for _ in range(100):  # bounded: the listing runs while the config is held
            if mem.registry.served(REFERRERS, digest):
                break
            hold.released.wait(0.05)
        assert mem.registry.served(REFERRERS, digest)
    finally:
        hold.release()
    assert mem.read_all(mem.layer(REF, layers[1].digest, "diff", "app", "hello.txt")) == b"hello from layer 2\n"
    assert len(mem.registry.served(REFERRERS, digest)) == 1
