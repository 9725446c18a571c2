"""`als index` against a real registry, its output served lazily by a real `als serve` mount.

The source image is the python root file system pushed as plain gzip, as any
tool pushes it. `als index` runs as a user would run it; the result must name
the very same config and layer blobs (mounted into the new repository, not
uploaded), carry each index as a blob of its own, and read back through the
mount file for file as the tar has them, fetching a file's span, not its layer.
"""

from __future__ import annotations

import json

import pytest

from als.formats import gzindex
from als.oci import GZIP_INDEX_ANNOTATION, OCI_MANIFEST
from tests.support import images
from tests.support.alsrun import get_blob, get_json, push_gzip, run_als, sha
from tests.support.difftree import actual_tree, expected_tree


@pytest.fixture(scope="module")
def python_rootfs() -> bytes:
    return images.python_rootfs_tar().read_bytes()


@pytest.fixture(scope="module")
def gzip_python(registry, client, python_rootfs):
    """The python root file system as plain gzip, as docker and most tools write it (level 6)."""
    ref = f"{registry.host}/idx/python:gzip"
    return ref, push_gzip(client, ref, python_rootfs, level=6)


@pytest.fixture(scope="module")
def indexed_python(registry, registries_conf, gzip_python):
    ref, _ = gzip_python
    dst = f"{registry.host}/idx/python-indexed:1"
    mark = registry.mark()
    res = run_als("index", ref, dst, conf=registries_conf)
    assert res.returncode == 0, res.stderr
    return dst, res, registry.accesses_since(mark)


def test_index_keeps_the_config_and_layers_and_adds_an_index_blob(registry, gzip_python, indexed_python,
                                                                  python_rootfs):
    src, layer = gzip_python
    dst, res, accesses = indexed_python
    assert res.stdout.strip().startswith(f"{dst}@sha256:")
    assert res.stderr == ""  # quiet in a pipe
    source = get_json(registry, "idx/python", "gzip")
    manifest = get_json(registry, "idx/python-indexed", "1")
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["config"]["digest"] == source["config"]["digest"]
    [desc] = manifest["layers"]
    assert (desc["digest"], desc["size"]) == (layer.digest, layer.size)
    index_digest = desc["annotations"][GZIP_INDEX_ANNOTATION]
    index = get_blob(registry, "idx/python-indexed", index_digest)
    assert len(index) < layer.size * 0.03, (len(index), layer.size)
    parsed = gzindex.parse_index(index, index_digest, layer_digest=layer.digest, layer_size=layer.size,
                                 max_size=64 << 20, max_entries=1 << 20)
    assert parsed.uncompressed_size == len(python_rootfs)
    assert len(parsed.checkpoints) == -(-len(python_rootfs) // (4 << 20))  # one every 4 MiB (the default)
    assert max(len(e.chunks) for e in parsed.toc.entries) > 1  # big files cross spans
    # The layer and the config are in the new repository without having been uploaded: mounted.
    assert get_blob(registry, "idx/python-indexed", layer.digest)
    uploads = [a for a in accesses if a.method in ("PUT", "PATCH") and "/blobs/uploads/" in a.uri]
    assert len(uploads) == 1, [a.uri for a in uploads]  # the index alone
    assert any(a.method == "POST" and "mount=sha256%3A" + layer.digest[7:] in a.uri for a in accesses)


def test_the_indexed_image_is_served_lazily_file_for_file(store, registry, gzip_python, indexed_python,
                                                          python_rootfs):
    _, layer = gzip_python
    dst, _, _ = indexed_python
    info_path = store.layer_dir(dst, layer.digest) / "info"
    mark = registry.mark()
    info = json.loads(info_path.read_text())
    assert info["diff-size"] == len(python_rootfs) and info["diff-digest"] == sha(python_rootfs)
    diff = store.layer_dir(dst, layer.digest) / "diff"
    with open(diff / "etc/passwd", "rb") as f:
        assert f.read().startswith(b"root:x:0:0")
    reads = [a for a in registry.accesses_since(mark) if layer.digest in a.uri]
    fetched = sum(a.written for a in reads)
    # /etc/passwd's span, and those of what every start reads (the store predicts them): not the layer
    assert 0 < fetched < layer.size / 2, (fetched, len(reads), layer.size)
    got, _ = actual_tree(str(diff))
    assert got == expected_tree(python_rootfs)
