"""`als index` against a real registry, its output served lazily by a real `als serve` mount.

The source image is the python root file system pushed as plain gzip, as any
tool pushes it. `als index` runs as a user would run it; the result must name
the very same config and layer blobs (mounted into the new repository, not
uploaded), carry each index as a blob of its own, and read back through the
mount file for file as the tar has them, fetching a file's span, not its layer.
"""

from __future__ import annotations

import gzip
import json

import pytest

from als.formats import gzindex
from als.formats.estargz import TOC_DIGEST_ANNOTATION
from als.oci import GZIP_INDEX_ANNOTATION, GZIP_INDEX_ARTIFACT_TYPE, GZIP_INDEX_LAYER_ANNOTATION, OCI_MANIFEST
from als.reference import parse_reference
from als.registry.referrers import EMPTY_DIGEST
from als.tools.image import gzip_layer
from tests.support import images
from tests.support.alsrun import get_blob, get_json, push_gzip, run_als, sha
from tests.support.difftree import actual_tree, expected_tree


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
    # The key Podman >= 5.1 asks the store by carries the same digest (docs/gzindex.md).
    assert desc["annotations"] == {GZIP_INDEX_ANNOTATION: index_digest, TOC_DIGEST_ANNOTATION: index_digest}
    index = get_blob(registry, "idx/python-indexed", index_digest)
    assert len(index) < layer.size * 0.03, (len(index), layer.size)  # 2.1%, measured
    parsed = gzindex.parse_index(index, index_digest, layer_digest=layer.digest, layer_size=layer.size,
                                 max_size=64 << 20, max_entries=1 << 20, diff_id=sha(python_rootfs))
    assert parsed.uncompressed_size == len(python_rootfs)
    assert abs(len(parsed.checkpoints) - len(python_rootfs) / (2 << 20)) <= 1  # one every 2 MiB (the default)
    assert max(len(e.chunks) for e in parsed.toc.entries) > 1  # big files cross spans
    # The layer and the config are in the new repository without having been uploaded: mounted.
    assert get_blob(registry, "idx/python-indexed", layer.digest)
    uploads = [a for a in accesses if a.method in ("PUT", "PATCH") and "/v2/idx/python-indexed/blobs/uploads/" in a.uri]
    assert len(uploads) == 1, [a.uri for a in uploads]  # the index alone
    assert any(a.method == "POST" and "mount=sha256%3A" + layer.digest[7:] in a.uri for a in accesses)


def test_index_publishes_the_indexes_as_a_referrer_of_the_source_manifest(registry, client, gzip_python,
                                                                          indexed_python):
    """Into SRC's repository: the index blob and a referrer of SRC's manifest (here through the referrers
    tag, Debian's registry has no referrers API) naming, per index, the layer it indexes."""
    src, layer = gzip_python
    dst, _, accesses = indexed_python
    source_digest = sha(get_raw(registry, "idx/python", "gzip"))
    [desc] = get_json(registry, "idx/python-indexed", "1")["layers"]
    index_digest = desc["annotations"][GZIP_INDEX_ANNOTATION]
    [listed] = client.list_referrers(parse_reference(src), source_digest, GZIP_INDEX_ARTIFACT_TYPE)
    referrer = get_json(registry, "idx/python", listed.digest)
    assert referrer["artifactType"] == GZIP_INDEX_ARTIFACT_TYPE
    assert referrer["subject"]["digest"] == source_digest
    assert [(d["mediaType"], d["digest"], d["annotations"]) for d in referrer["layers"]] == [
        (gzindex.MEDIA_TYPE, index_digest, {GZIP_INDEX_LAYER_ANNOTATION: layer.digest})]
    assert get_blob(registry, "idx/python", index_digest)
    # Nothing but the index and the empty config of an artifact is uploaded to SRC's repository.
    uploads = {a.uri.rpartition("digest=")[2].replace("%3A", ":") for a in accesses
               if a.method == "PUT" and "/v2/idx/python/blobs/uploads/" in a.uri}
    assert uploads == {index_digest, EMPTY_DIGEST}, uploads


def test_index_without_referrers_leaves_the_source_repository_alone(registry, registries_conf, client,
                                                                    gzip_python):
    src, _ = gzip_python
    mark = registry.mark()
    res = run_als("index", "--no-referrers", "--span-size", "1M", src, f"{registry.host}/idx/python-noref:1",
                  conf=registries_conf)
    assert res.returncode == 0, res.stderr
    assert not [a for a in registry.accesses_since(mark) if a.method != "GET" and "/v2/idx/python/" in a.uri]


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


def test_a_layout_is_indexed_into_another_and_only_gzip_layers_get_an_index(tmp_path):
    """Without a registry: every blob is copied; eStargz and zstd layers are kept as they are."""
    import io

    import zstandard

    from als.formats import toc as T
    from als.oci import DOCKER_LAYER_GZIP, OCI_LAYER_GZIP
    from als.tools.image import estargz_layer
    from als.tools.index import IndexOptions, index_image
    from als.tools.transport import OCILayout
    from tests.support.alsrun import config_for, tar_of

    big = random_text(300_000)
    plain = gzip_layer(tar_of({"big": big, "small": b"hello\n"}), level=6)
    esgz = estargz_layer(io.BytesIO(tar_of({"e": b"estargz\n"})))
    esgz_blob = esgz.blob.read()
    zstd_tar = tar_of({"z": b"zstd\n"})
    zstd_blob = zstandard.ZstdCompressor().compress(zstd_tar)
    src = OCILayout(tmp_path / "src", "v1")
    config = config_for([plain, esgz, esgz])
    descs = [dict(plain.descriptor(), mediaType=DOCKER_LAYER_GZIP), esgz.descriptor(),
             {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": sha(zstd_blob),
              "size": len(zstd_blob)}]
    for data in (plain.blob.getvalue(), esgz_blob, zstd_blob, config):
        src.push_blob(io.BytesIO(data), sha(data), len(data))
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": sha(config), "size": len(config)}, "layers": descs}).encode()
    src.put_manifest(manifest, OCI_MANIFEST, tagged=True)

    dst = OCILayout(tmp_path / "dst", "indexed")
    result = index_image(src, dst, IndexOptions(span_size=64 << 10))
    out = json.loads(dst.get_blob(result.digest, 1 << 20))
    assert out["config"]["digest"] == sha(config)
    assert [d["digest"] for d in out["layers"]] == [d["digest"] for d in descs]
    indexed, kept_esgz, kept_zstd = out["layers"]
    assert indexed["mediaType"] == OCI_LAYER_GZIP  # Docker's name for the same bytes
    assert kept_esgz == esgz.descriptor() and kept_zstd == descs[2]
    assert [r.note for r in result.images[0]] == ["copied", "eStargz already, copied", "not gzip, copied"]
    for d in out["layers"]:
        assert dst.has_blob(d["digest"])
    index_digest = indexed["annotations"][GZIP_INDEX_ANNOTATION]
    parsed = gzindex.parse_index(dst.get_blob(index_digest, 1 << 20), index_digest, layer_digest=plain.digest,
                                 layer_size=plain.size, max_size=1 << 20, max_entries=100)
    blob = plain.blob.getvalue()
    [entry] = [e for e in parsed.toc.entries if e.name == "data/big"]
    assert len(entry.chunks) > 1
    assert b"".join(gzindex.decompress_chunk(blob[c.blob_start:c.blob_end], c) for c in entry.chunks) == big
    assert all(c.span is not None for c in entry.chunks) and parsed.toc.compression == T.GZIP_SPANS


def random_text(n: int) -> bytes:
    import random
    return bytes(random.Random(n).choices(b"abcdefgh \n", k=n))


@pytest.mark.slow
def test_podman_4_runs_the_indexed_image_lazily(tmp_path, registry, registries_conf, gzip_python, indexed_python):
    """Podman 4.3.1 asks the store about every layer by its blob digest: the indexed image runs with a
    fraction of its (unchanged) gzip layer fetched, and Podman counts its exact uncompressed size."""
    from als.tools.podman import Podman
    from tests.conftest import NO_BACKGROUND
    from tests.support.store_process import StoreProcess
    _, layer = gzip_python
    dst, _, _ = indexed_python
    (tmp_path / "als").mkdir()
    mark = registry.mark()
    with StoreProcess(tmp_path / "als", registries_conf=registries_conf, config=NO_BACKGROUND) as store, \
            Podman(tmp_path / "lazy", additional_layer_store=store.mountpoint,
                   insecure_registries=[registry.host]) as podman:
        assert podman.run("run", "--rm", dst, "python3", "-c", "print(1)").stdout.strip() == "1"
        size = podman.run("image", "inspect", "--format", "{{.Size}}", dst).stdout.strip()
    reads = [a for a in registry.accesses_since(mark) if layer.digest in a.uri]
    fetched = sum(a.written for a in reads)
    print(f"podman 4.3.1 run of the indexed image: {fetched} of {layer.size} bytes in {len(reads)} requests")
    assert 0 < fetched < layer.size * 2 / 3, f"{fetched} of {layer.size} bytes"  # 9.2 MB of 18.6 MB, measured
    assert int(size) >= len(images.python_rootfs_tar().read_bytes())  # the exact diff size counted


def test_index_into_the_same_repository_uploads_only_the_index(registry, registries_conf, gzip_python):
    src, layer = gzip_python
    mark = registry.mark()
    res = run_als("index", src, f"{registry.host}/idx/python:indexed", conf=registries_conf)
    assert res.returncode == 0, res.stderr
    accesses = registry.accesses_since(mark)
    assert not any("mount=" in a.uri for a in accesses)  # the layer is there already
    uploads = [a for a in accesses if a.method == "PUT" and "/blobs/uploads/" in a.uri]
    # the index alone (another test's `als index` may have stored this very index there as a referrer)
    assert len(uploads) <= 1, [a.uri for a in uploads]
    assert all(a.uri.endswith("digest=" + desc_index(registry).replace(":", "%3A")) for a in uploads)
    [desc] = get_json(registry, "idx/python", "indexed")["layers"]
    assert desc["digest"] == layer.digest and GZIP_INDEX_ANNOTATION in desc["annotations"]


def desc_index(registry) -> str:
    [desc] = get_json(registry, "idx/python", "indexed")["layers"]
    return desc["annotations"][GZIP_INDEX_ANNOTATION]


def get_raw(registry, repo: str, reference: str) -> bytes:
    import urllib.request
    req = urllib.request.Request(f"{registry.url}/v2/{repo}/manifests/{reference}", headers={"Accept": OCI_MANIFEST})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def test_indexing_an_indexed_image_again_replaces_its_index_and_drops_a_stale_key(tmp_path):
    """DST indexed again (another span size) gets a new index under both keys; an eStargz layer that kept
    our key from the gzip layer it was converted from (a stale value) is kept as eStargz, without it."""
    import io

    from als.tools.image import estargz_layer
    from als.tools.index import IndexOptions, index_image
    from als.tools.transport import OCILayout
    from tests.support.alsrun import config_for, tar_of

    plain = gzip_layer(tar_of({"big": random_text(300_000)}), level=6)
    esgz = estargz_layer(io.BytesIO(tar_of({"e": b"estargz\n"})))
    stale = sha(b"the index of the gzip layer it was converted from")
    src = OCILayout(tmp_path / "src", "v1")
    config = config_for([plain, esgz])
    for data in (plain.blob.getvalue(), esgz.blob.read(), config):
        src.push_blob(io.BytesIO(data), sha(data), len(data))
    descs = [plain.descriptor(), dict(esgz.descriptor(), annotations={**esgz.annotations, GZIP_INDEX_ANNOTATION: stale})]
    src.put_manifest(json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                 "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                            "digest": sha(config), "size": len(config)},
                                 "layers": descs}).encode(), OCI_MANIFEST, tagged=True)
    first = OCILayout(tmp_path / "first", "1")
    index_image(src, first, IndexOptions(span_size=64 << 10))
    second = OCILayout(tmp_path / "second", "1")
    result = index_image(first, second, IndexOptions(span_size=128 << 10))
    indexed, kept = json.loads(second.get_blob(result.digest, 1 << 20))["layers"]
    assert [r.note for r in result.images[0]] == ["copied", "eStargz already, copied"]
    again = indexed["annotations"][GZIP_INDEX_ANNOTATION]
    assert indexed["annotations"] == {GZIP_INDEX_ANNOTATION: again, TOC_DIGEST_ANNOTATION: again}
    assert json.loads(gzip.decompress(second.get_blob(again, 1 << 20)))["spanSize"] == 128 << 10
    assert kept["annotations"] == esgz.annotations  # the stale key is gone
    assert result.referrers == ["not published: SRC is not in a registry"]


def test_each_platform_of_an_index_gets_its_referrer_and_the_store_finds_this_hosts(registry, registries_conf,
                                                                                    client, tmp_path):
    """A multi-platform SRC: one referrer per platform manifest, naming that platform's layer; the store,
    asked by blob digest, picks this host's manifest from the index and its referrer."""
    from als.oci import OCI_INDEX
    from als.tools.image import push_image
    from als.store.platforms import host_platform
    from tests.support.alsrun import config_for, tar_of

    host_arch = host_platform()[1]
    arches = [host_arch, "s390x" if host_arch != "s390x" else "amd64"]
    layers, entries = {}, []
    for arch in arches:
        layer = gzip_layer(tar_of({"arch": f"{arch}\n".encode(), "pad": random_text(200_000)}), level=6)
        digest = push_image(client, parse_reference(f"{registry.host}/idx/multi:{arch}"), [layer],
                            config_for([layer], arch=arch))
        layers[arch] = layer
        entries.append({"mediaType": OCI_MANIFEST, "digest": digest,
                        "size": len(get_raw(registry, "idx/multi", arch)),
                        "platform": {"os": "linux", "architecture": arch}})
    src = f"{registry.host}/idx/multi:all"
    client.put_manifest(parse_reference(src), json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                          "manifests": entries}).encode(), OCI_INDEX)
    res = run_als("index", "--span-size", "64K", src, f"{registry.host}/idx/multi-indexed:all", conf=registries_conf)
    assert res.returncode == 0, res.stderr
    for arch, entry in zip(arches, entries):
        [listed] = client.list_referrers(parse_reference(src), entry["digest"], GZIP_INDEX_ARTIFACT_TYPE)
        referrer = get_json(registry, "idx/multi", listed.digest)
        assert [d["annotations"][GZIP_INDEX_LAYER_ANNOTATION] for d in referrer["layers"]] == [layers[arch].digest]
    from tests.conftest import NO_BACKGROUND
    from tests.support.store_process import StoreProcess
    (tmp_path / "als").mkdir()
    referrers_on = NO_BACKGROUND + "[resolve]\ngzip_index_referrers = true\n"  # off as shipped
    with StoreProcess(tmp_path / "als", registries_conf=registries_conf, config=referrers_on) as store:
        diff = store.layer_dir(src, layers[host_arch].digest) / "diff"
        assert (diff / "data" / "arch").read_bytes() == f"{host_arch}\n".encode()
        assert f"{layers[host_arch].digest}: serving it through gzip index" in store.log()
