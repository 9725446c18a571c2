"""The store through a real FUSE mount, fed by a real registry.

A multi-layer eStargz image exercising every entry type is pushed to
docker-registry; `als serve` mounts the store; the tests walk `diff/` and
compare it with the source tars entry by entry, and check `info`, `blob`,
`use`/`rmdir` and the decline path the way containers/storage uses them.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from als.config import Config
from als.fetch.cache import ChunkCache
from als.formats import estargz
from als.tools.image import estargz_layer, gzip_layer, push_image
from als.reference import parse_reference
from tests.support import images
from tests.support.difftree import actual_tree, expected_tree

CHUNK = 256 << 10


@pytest.fixture(scope="module")
def tree_image(registry, client):
    tars = images.tree_layers()
    layers = [estargz_layer(io.BytesIO(t), chunk_size=CHUNK) for t in tars]
    ref = f"{registry.host}/tree:esgz"
    push_image(client, parse_reference(ref), layers)
    return ref, tars, layers


@pytest.fixture(scope="module")
def plain_image(registry, client):
    tars = images.tree_layers()[:1]
    layers = [gzip_layer(t) for t in tars]
    ref = f"{registry.host}/tree:gzip"
    push_image(client, parse_reference(ref), layers)
    return ref, layers


def blob_bytes(layer) -> bytes:
    layer.blob.seek(0)
    return layer.blob.read()


# ---- what a layer should look like, from its tar --------------------------------------


# ---- tests ----------------------------------------------------------------------------------
def test_diff_matches_each_source_tar(store, tree_image):
    ref, tars, layers = tree_image
    linked = 0
    for tar, layer in zip(tars, layers):
        diff = str(store.layer_dir(ref, layer.digest) / "diff")
        want = expected_tree(tar)
        got, stats = actual_tree(diff)
        assert set(got) == set(want), f"entries differ: {set(got) ^ set(want)}"
        for path in want:
            assert got[path] == want[path], path
        # hard links share one inode and count their names
        by_ino: dict[int, list[str]] = {}
        for path, st in stats.items():
            if stat.S_ISREG(st.st_mode):
                by_ino.setdefault(st.st_ino, []).append(path)
        for paths in by_ino.values():
            assert all(stats[p].st_nlink == len(paths) for p in paths), paths
            linked += len(paths) > 1
    assert linked, "the test tree should hold hard links"


def test_info_is_exact_for_both_kinds_of_key(store, tree_image):
    ref, tars, layers = tree_image
    for tar, layer in zip(tars, layers):
        uncompressed = gzip.decompress(blob_bytes(layer))
        info = json.loads((store.layer_dir(ref, layer.digest) / "info").read_bytes())
        assert info == {"compressed-diff-digest": layer.digest, "compressed-size": layer.size,
                        "diff-digest": layer.diff_id, "diff-size": len(uncompressed), "compression": 2}
        assert layer.diff_id == "sha256:" + hashlib.sha256(uncompressed).hexdigest()
        toc = layer.annotations[estargz.TOC_DIGEST_ANNOTATION]
        by_toc = json.loads((store.layer_dir(ref, toc) / "info").read_bytes())
        assert by_toc["toc-digest"] == toc
        assert by_toc["flags"] == {"expected-layer-diffid": layer.diff_id}
        assert by_toc["diff-size"] == len(uncompressed) and "diff-digest" not in by_toc
        assert os.path.isdir(store.layer_dir(ref, toc) / "diff")


def test_blob_reads_back_the_compressed_layer(store, tree_image):
    ref, _, layers = tree_image
    layer = layers[0]
    want = blob_bytes(layer)
    path = store.layer_dir(ref, layer.digest) / "blob"
    assert os.stat(path).st_size == len(want)
    with open(path, "rb") as f:
        got = b"".join(iter(lambda: f.read(100_000), b""))
    assert got == want


def test_use_and_release_answer_enoent_and_count(store, tree_image):
    ref, _, layers = tree_image
    d = store.layer_dir(ref, layers[0].digest)
    with pytest.raises(FileNotFoundError):
        os.open(d / "use", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    assert not (d / "use").exists()
    with pytest.raises(FileNotFoundError):
        os.rmdir(d)
    assert (d / "diff").is_dir()  # nothing was removed
    log = store.log()
    assert f"layer {layers[0].digest}: in use (1)" in log and f"layer {layers[0].digest}: released (0)" in log


def test_plain_gzip_layer_is_declined(store, plain_image):
    ref, layers = plain_image
    d = store.layer_dir(ref, layers[0].digest)
    with pytest.raises(OSError) as e:
        os.stat(d / "diff")
    assert e.value.errno == errno.EIO
    assert f"image {ref} layer {layers[0].digest}: declined" in store.log()


def test_unknown_names_do_not_exist(store, tree_image):
    ref, _, layers = tree_image
    assert not (store.mountpoint / "not-base64!").exists()
    assert not store.layer_dir(ref, "sha256:" + "ab" * 32).joinpath("diff").exists()
    assert not store.layer_dir(ref, layers[0].digest).joinpath("other").exists()
    with pytest.raises(OSError) as e:
        (store.layer_dir(ref, layers[0].digest) / "diff" / "new").write_text("x")
    assert e.value.errno in (errno.EROFS, errno.EACCES, errno.ENOSYS, errno.EPERM)


def single_file_image(registry, client, name: str, data: bytes):
    ref = f"{registry.host}/{name}:esgz"
    return ref, images.push_files(client, ref, {name: data}, chunk_size=CHUNK)


def test_a_read_fetches_only_the_chunks_it_touches(store, registry, client):
    data = os.urandom(16 * CHUNK)  # fresh content: nothing of it is cached yet
    ref, layer = single_file_image(registry, client, "big", data)
    big = store.layer_dir(ref, layer.digest) / "diff" / "big"
    assert big.stat().st_size == len(data)  # resolved: footer and TOC are read
    mark = registry.mark()
    with open(big, "rb") as f:
        f.seek(5 * CHUNK + 10)
        assert f.read(100) == data[5 * CHUNK + 10:5 * CHUNK + 110]
    fetched = sum(a.written for a in registry.accesses_since(mark) if layer.digest in a.uri)
    assert 0 < fetched <= 2 * CHUNK + 4096, fetched


def test_concurrent_readers_share_one_fetch_per_chunk(store, registry, client):
    data = os.urandom(8 * CHUNK)
    ref, layer = single_file_image(registry, client, "shared", data)
    path = store.layer_dir(ref, layer.digest) / "diff" / "shared"
    assert path.stat().st_size == len(data)
    mark = registry.mark()

    def read_all(_):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    with ThreadPoolExecutor(16) as pool:
        results = set(pool.map(read_all, range(32)))
    assert results == {hashlib.sha256(data).hexdigest()}
    fetched = sum(a.written for a in registry.accesses_since(mark) if layer.digest in a.uri)
    assert fetched <= layer.size, f"{fetched} bytes fetched for a {layer.size}-byte layer"


def test_a_tampered_chunk_reads_as_eio_and_is_never_cached(store, registry, client):
    data = os.urandom(4 * CHUNK)
    ref, layer = single_file_image(registry, client, "tampered", data)
    path = store.layer_dir(ref, layer.digest) / "diff" / "tampered"
    assert path.stat().st_size == len(data)  # resolved from the honest TOC
    h = layer.digest.split(":")[1]
    blob = registry.root / "data" / "docker/registry/v2/blobs/sha256" / h[:2] / h / "data"
    raw = bytearray(blob.read_bytes())
    raw[CHUNK + CHUNK // 2] ^= 0xFF  # inside the second chunk's compressed bytes
    blob.write_bytes(bytes(raw))
    with open(path, "rb") as f:
        assert f.read(1000) == data[:1000]  # the first chunk is intact
        f.seek(CHUNK + 10)
        with pytest.raises(OSError) as e:
            f.read(1000)
        assert e.value.errno == errno.EIO
    assert f"layer {layer.digest} file /tampered: read failed" in store.log()
    cache = ChunkCache(store.root / "cache", memory_bytes=0)  # what the store wrote, read beside it
    checked, removed = cache.verify()
    cache.close()
    assert checked and not removed


def test_an_unreachable_registry_declines_within_the_bound(store):
    """Nothing listens there: the layer is declined (EIO: the engine pulls it itself) as soon as the
    registry's refusals have been retried, not after the resolve timeout, which is the bound."""
    from tests.support.registry import free_port
    port = free_port()
    ref = f"127.0.0.1:{port}/nothing:here"
    bound = Config().resolve.timeout  # the store fixture keeps the default
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        os.stat(store.layer_dir(ref, "sha256:" + "cd" * 32) / "diff")
    took = time.monotonic() - t0
    assert e.value.errno == errno.EIO
    log = store.log()
    assert f"image {ref}: cannot resolve: registry 127.0.0.1:{port} is unreachable" in log
    assert f"image {ref}: not resolved within" not in log
    assert took < bound, f"declined after {took:.1f}s, not before the {bound:g}s resolve timeout"
