"""An ordinary gzip layer served lazily through its index, by the store over an in-memory registry.

The layer is the plain gzip blob any tool pushes; the index is a separate
blob in the same repository, named by the layer's annotation. The store must
verify it against that digest, serve every file byte for byte from spans,
give containers/storage the exact diff size, and decline (EIO) a layer whose
index does not check out, so that Podman pulls it normally.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import logging
import random
import tarfile

import pytest

from als.errors import ALSError
from als.formats import gzindex_writer
from als.formats.estargz import TOC_DIGEST_ANNOTATION
from als.oci import GZIP_INDEX_ANNOTATION, OCI_CONFIG, OCI_MANIFEST
from als.reference import parse_reference
from als.tools.image import gzip_layer, image_config
from tests.support import images, memstore
from tests.support.memregistry import BLOB, RANGE

REF = "registry.test/als/indexed:1"
SPAN = 64 << 10


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def entries() -> list[images.Entry]:
    rnd = random.Random(5)
    out = [images.Entry("etc", images.DIR, 0o755), images.Entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n")]
    out += [images.Entry(f"etc/f{i}", data=rnd.randbytes(rnd.randrange(10, 40_000))) for i in range(40)]
    out += [images.Entry("big", data=bytes(rnd.choices(b"abc \n", k=700_000)), mode=0o755)]
    return out


def both_keys(index_digest: str) -> dict[str, str]:
    """The annotations `als index` writes: the eStargz TOC key and ours, the same digest."""
    return {TOC_DIGEST_ANNOTATION: index_digest, GZIP_INDEX_ANNOTATION: index_digest}


def push_indexed(registry, tmp_path, *, index_for=None, tamper=None, annotations=both_keys,
                 ) -> tuple[bytes, object, str]:
    """Push the gzip layer, its index and a manifest with ``annotations(index digest)`` on the layer;
    (the tar, the layer, the index digest)."""
    tar = images.layer_tar(entries())
    layer = gzip_layer(tar, level=6)
    blob = layer.blob.getvalue()
    path = tmp_path / "layer.gz"
    path.write_bytes(blob)
    index = gzindex_writer.write_index(str(path), layer_digest=(index_for or layer).digest,
                                       layer_size=layer.size, span_size=SPAN)
    if tamper is not None:
        index = tamper(index)
    ref = parse_reference(REF)
    config = image_config([layer])
    for data in (blob, index, config):
        registry.push_blob(ref, data, sha(data), len(data))
    desc = dict(layer.descriptor(), annotations=annotations(sha(index)))
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
                           "layers": [desc]}).encode()
    registry.put_manifest(ref, manifest, OCI_MANIFEST)
    return tar, layer, sha(index)


def test_every_file_is_served_from_spans_with_the_exact_diff_size(mem, tmp_path):
    tar, layer, index_digest = push_indexed(mem.registry, tmp_path)
    info = json.loads(mem.read_all(mem.layer(REF, layer.digest, "info")))
    assert info["diff-size"] == len(tar) and info["diff-digest"] == sha(tar)
    assert info["compressed-diff-digest"] == layer.digest and info["compression"] == 2
    assert [b.name for b in mem.registry.served(BLOB)].count(index_digest) == 1  # the index, fetched once
    before = mem.registry.bytes_served
    assert mem.read_all(mem.layer(REF, layer.digest, "diff", "etc", "passwd")).startswith(b"root:x:0:0")
    assert mem.registry.bytes_served - before < layer.size / 2  # its span, not the layer
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf:
            if m.isreg():
                node = mem.layer(REF, layer.digest, "diff", *m.name.split("/"))
                assert mem.read_all(node) == tf.extractfile(m).read(), m.name
                assert mem.getattr(node).mode & 0o7777 == m.mode
    spans = len(gzip.decompress(mem.registry.blobs[index_digest]).decode().split('"window"')) - 1
    assert len(mem.registry.served(RANGE)) <= spans  # one range request per span at most


def test_the_index_is_fetched_beside_the_config_not_after_it(mem, tmp_path):
    """The manifest names the index: its fetch starts before the config is in (a round trip and its
    transfer off the pull), and it is not fetched a second time when the layer resolves."""
    import threading
    import time

    tar, layer, index_digest = push_indexed(mem.registry, tmp_path)
    manifest = json.loads(mem.registry.manifests[(parse_reference(REF).name, "1")][0])
    hold = mem.registry.hold(BLOB, manifest["config"]["digest"])
    info: dict = {}
    thread = threading.Thread(target=lambda: info.update(
        json.loads(mem.read_all(mem.layer(REF, layer.digest, "info")))))
    thread.start()
    try:
        assert hold.arrived.wait(30)
        deadline = time.monotonic() + 5  # well inside the hold's own limit (HOLD_LIMIT)
        while not mem.registry.served(BLOB, index_digest) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mem.registry.served(BLOB, index_digest), "the index waited for the config"
    finally:
        hold.release()
        thread.join(60)
    assert info["diff-size"] == len(tar)
    assert len(mem.registry.served(BLOB, index_digest)) == 1


def _declined(mem, layer, caplog, words: str) -> None:
    with pytest.raises(ALSError) as e:
        mem.store.layer(REF, layer.digest)
    assert e.value.errno == errno.EIO
    assert words in caplog.text


def test_an_index_that_does_not_match_its_annotation_is_declined(mem, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="als.store")
    _, layer, index_digest = push_indexed(mem.registry, tmp_path)
    mem.registry.blobs[index_digest] = gzip.compress(b'{"version": 1}')  # other bytes under its digest
    _declined(mem, layer, caplog, "gzip index digest is")


def test_an_index_of_another_layer_is_declined(mem, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="als.store")
    other = gzip_layer(b"\0" * 10240)
    _, layer, _ = push_indexed(mem.registry, tmp_path, index_for=other)
    _declined(mem, layer, caplog, "gzip index is for layer")


def test_a_lying_index_fails_reads_with_eio_never_with_wrong_bytes(mem, tmp_path):
    def move_passwd(index: bytes) -> bytes:
        doc = json.loads(gzip.decompress(index))
        for e in doc["entries"]:
            if e["name"] == "etc/passwd":
                e["offset"] += 3
        return gzip.compress(json.dumps(doc).encode())

    _, layer, _ = push_indexed(mem.registry, tmp_path, tamper=move_passwd)
    node = mem.layer(REF, layer.digest, "diff", "etc", "passwd")
    with pytest.raises(OSError) as e:
        mem.read_all(node)
    assert e.value.errno == errno.EIO
    assert mem.read_all(mem.layer(REF, layer.digest, "diff", "etc", "f1"))  # the others still serve


def test_a_span_fetched_for_one_file_brings_every_file_of_it(tmp_path):
    """Without any read-ahead, each span is fetched once, whichever of its files is read first."""
    config = memstore.QUIET + "readahead_min = 0\nreadahead_max = 0\nfile_readahead = 0\ndir_readahead = 0\n"
    with memstore.harness(tmp_path, config) as mem:
        _read_shuffled(mem, tmp_path)


def _read_shuffled(mem, tmp_path) -> None:
    tar, layer, index_digest = push_indexed(mem.registry, tmp_path)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        files = [m for m in tf if m.isreg()]
        contents = {m.name: tf.extractfile(m).read() for m in files}
    random.Random(1).shuffle(files)  # no order a read-ahead could follow
    for m in files:
        assert mem.read_all(mem.layer(REF, layer.digest, "diff", *m.name.split("/"))) == contents[m.name]
    spans = len(gzip.decompress(mem.registry.blobs[index_digest]).decode().split('"window"')) - 1
    assert len(mem.registry.served(RANGE)) <= spans, (len(mem.registry.served(RANGE)), spans)


def test_a_restarted_store_serves_an_indexed_layer_from_its_saved_index_and_cache(tmp_path, caplog):
    """The index is kept in the state directory like a TOC: no registry needed for what was read before."""
    from tests.support.memregistry import MANIFEST, MemoryRegistry

    registry = MemoryRegistry()
    tar, layer, index_digest = push_indexed(registry, tmp_path)
    with memstore.harness(tmp_path, registry=registry) as h:
        assert h.read_all(h.layer(REF, layer.digest, "diff", "etc", "passwd")).startswith(b"root:")
        h.cache.flush()
    caplog.set_level(logging.WARNING, logger="als.store")
    for kind in (MANIFEST, BLOB, RANGE):
        registry.fail(kind, times=100)
    with memstore.harness(tmp_path, registry=registry) as h:  # the same state and cache directories
        info = json.loads(h.read_all(h.layer(REF, layer.digest, "info")))
        assert info["diff-size"] == len(tar)
        assert h.read_all(h.layer(REF, layer.digest, "diff", "etc", "passwd")).startswith(b"root:")
        assert f"image {REF} layer {layer.digest}: serving it from saved metadata" in caplog.text
        assert "saved gzip index is unusable" not in caplog.text


# ---- which layers are gzip-indexed: both keys, one digest, an index naming this blob and DiffID --------

def test_looked_up_by_its_toc_digest_info_echoes_the_annotation_value(mem, tmp_path):
    """Podman >= 5.1 asks by the annotation's value and fails the pull unless `info` says it back."""
    tar, layer, index_digest = push_indexed(mem.registry, tmp_path)
    info = json.loads(mem.read_all(mem.layer(REF, index_digest, "info")))
    assert info["toc-digest"] == index_digest and "diff-digest" not in info
    assert info["flags"] == {"expected-layer-diffid": sha(tar)}
    assert info["diff-size"] == len(tar) and info["compressed-size"] == layer.size
    assert mem.read_all(mem.layer(REF, index_digest, "diff", "etc", "passwd")).startswith(b"root:x:0:0")


def test_our_key_alone_is_declined(mem, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="als.store")
    _, layer, index_digest = push_indexed(mem.registry, tmp_path,
                                          annotations=lambda d: {GZIP_INDEX_ANNOTATION: d})
    _declined(mem, layer, caplog, f"but not in {TOC_DIGEST_ANNOTATION} too")
    assert not mem.registry.served(BLOB, index_digest)


def test_the_stargz_key_alone_is_taken_for_estargz_and_declined(mem, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="als.store")
    _, layer, index_digest = push_indexed(mem.registry, tmp_path,
                                          annotations=lambda d: {TOC_DIGEST_ANNOTATION: d})
    _declined(mem, layer, caplog, "declined")
    assert not mem.registry.served(BLOB, index_digest)  # never read as an index


def test_keys_that_disagree_are_not_an_index(mem, tmp_path, caplog):
    """A plain gzip layer whose keys disagree is declined without its index being read."""
    caplog.set_level(logging.WARNING, logger="als.store")
    other = sha(b"another index")
    _, layer, index_digest = push_indexed(mem.registry, tmp_path, annotations=lambda d: {
        TOC_DIGEST_ANNOTATION: other, GZIP_INDEX_ANNOTATION: d})
    _declined(mem, layer, caplog, "declined")
    assert not mem.registry.served(BLOB, index_digest)


def test_a_real_estargz_layer_with_a_stale_index_key_is_served_as_estargz(mem):
    """stargz-snapshotter's converter keeps descriptor annotations it does not know: ours, stale."""
    layer = memstore.estargz(entries())
    layer.annotations[GZIP_INDEX_ANNOTATION] = sha(b"the index of the gzip layer it was converted from")
    memstore.push(mem.registry, REF, [layer])
    info = json.loads(mem.read_all(mem.layer(REF, layer.digest, "info")))
    assert info["diff-digest"] == layer.diff_id
    assert mem.read_all(mem.layer(REF, layer.digest, "diff", "etc", "passwd")).startswith(b"root:x:0:0")


def _with_layer_field(key: str, value):
    def tamper(index: bytes) -> bytes:
        doc = json.loads(gzip.decompress(index))
        if value is None:
            del doc["layer"][key]
        else:
            doc["layer"][key] = value
        return gzip.compress(json.dumps(doc).encode())
    return tamper


def test_an_index_of_another_diff_id_is_declined(mem, tmp_path, caplog):
    """The index digest becomes the layer's identity in containers/storage: it must commit to the
    DiffID the image config gives, not only to the blob."""
    caplog.set_level(logging.WARNING, logger="als.store")
    _, layer, _ = push_indexed(mem.registry, tmp_path, tamper=_with_layer_field("diffID", sha(b"other")))
    _declined(mem, layer, caplog, "the image config says")


def test_an_index_without_a_diff_id_is_declined(mem, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="als.store")
    _, layer, _ = push_indexed(mem.registry, tmp_path, tamper=_with_layer_field("diffID", None))
    _declined(mem, layer, caplog, "diffID")
