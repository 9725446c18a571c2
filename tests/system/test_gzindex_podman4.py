"""Podman 4.3.1 pulling an image Podman itself pushed, lazily, through `als index` and `als serve`.

The source image is built the way users build one: `podman import` of a
root file system, a container that writes a file, `podman commit`, `podman
push` (Docker schema 2, Go's gzip). `als index` leaves it as it is and
writes DST beside it; Podman 4.3.1 asks the store about every layer by its
blob digest, so it pulls both lazily: SRC through the referrer `als index`
published, DST through its annotations. Laziness is judged from the
registry's log (no request ever sends a whole layer blob: Podman's own GET
would, while the store's range requests start at a checkpoint past the gzip
header) and from the store's log (it served every layer); correctness from a
file's sha256 read inside the container. A tampered index fails the read
with EIO, and never gives a wrong byte.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile

import pytest

from als.formats import gzindex
from als.formats.estargz import TOC_DIGEST_ANNOTATION
from als.oci import GZIP_INDEX_ANNOTATION, OCI_MANIFEST
from als.tools.podman import Podman
from tests.conftest import NO_BACKGROUND
from tests.support import images
from tests.support.alsrun import get_blob, get_json, run_als
from tests.support.store_process import StoreProcess

pytestmark = pytest.mark.slow

DATA = "".join(f"line {i} of the file the committed layer adds\n" for i in range(20000)).encode()
DATA_SHA = hashlib.sha256(DATA).hexdigest()
WRITE = ("mkdir -p /srv && python3 -c \"open('/srv/data.txt', 'w').write(''.join("
         "f'line {i} of the file the committed layer adds\\n' for i in range(20000)))\"")
CHECK = ["/bin/sh", "-c", "sha256sum /srv/data.txt && python3 -c 'print(1)'"]
ACCEPT = "application/vnd.docker.distribution.manifest.v2+json, " + OCI_MANIFEST


@pytest.fixture(scope="module")
def podman_source(registry, tmp_path_factory) -> tuple[str, list[dict]]:
    """SRC, as Podman 4.3.1 builds and pushes it: (its reference, its layer descriptors)."""
    ref = f"{registry.host}/gzw/src:podman"
    with Podman(tmp_path_factory.mktemp("builder"), insecure_registries=[registry.host]) as podman:
        podman.import_tar(images.python_rootfs_tar(), "localhost/gzw/base:1")
        podman.run("run", "--name", "writer", "localhost/gzw/base:1", "/bin/sh", "-c", WRITE)
        podman.run("commit", "--quiet", "writer", "localhost/gzw/src:1")
        podman.push("localhost/gzw/src:1", ref, "--format", "v2s2")
    manifest = get_json(registry, "gzw/src", "podman", accept=ACCEPT)
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert len(manifest["layers"]) == 2
    return ref, manifest["layers"]


@pytest.fixture(scope="module")
def indexed(registry, registries_conf, podman_source) -> str:
    src, _ = podman_source
    dst = f"{registry.host}/gzw/indexed:1"
    res = run_als("index", src, dst, conf=registries_conf)
    assert res.returncode == 0, res.stderr
    return dst


def full_gets(registry, mark: int, layers: list[dict]) -> list[str]:
    """Requests since ``mark`` that sent a whole layer blob as a normal pull does (200, not a range's 206:
    a new store's first lookup by blob digest reads the blob's last 512 KiB, all of a smaller one, before
    the manifest says the layer is not eStargz)."""
    sizes = {d["digest"]: d["size"] for d in layers}
    return [a.uri for a in registry.accesses_since(mark)
            if a.status == 200 and any(a.uri.endswith(d) and a.written >= s for d, s in sizes.items())]


def lazy_run(tmp_path, registry, registries_conf, ref: str, layers: list[dict], name: str) -> tuple[str, str]:
    """Run CHECK in ``ref`` on a fresh Podman over a fresh store; (its output, the store's log)."""
    (tmp_path / f"als-{name}").mkdir()
    mark = registry.mark()
    # the referrer path is off by default (config/config.toml says why): SRC is served through it only when on
    config = NO_BACKGROUND + "[resolve]\ngzip_index_referrers = true\n"
    with StoreProcess(tmp_path / f"als-{name}", registries_conf=registries_conf, config=config) as store, \
            Podman(tmp_path / f"podman-{name}", additional_layer_store=store.mountpoint,
                   insecure_registries=[registry.host]) as podman:
        out = podman.run("run", "--rm", ref, *CHECK).stdout
        log = store.log()
    assert full_gets(registry, mark, layers) == []  # no layer was pulled
    fetched = sum(a.written for a in registry.accesses_since(mark) if a.uri.endswith(layers[0]["digest"]))
    print(f"{ref}: {fetched} of {layers[0]['size']} bytes of the python layer fetched")
    assert 0 < fetched < layers[0]["size"] * 2 / 3, (fetched, layers[0]["size"])  # spans: 54%, measured
    for d in layers:
        assert f"layer {d['digest']}: in use" in log, log[-3000:]
    return out, log


def test_podman_4_pulls_the_podman_pushed_source_lazily_through_its_referrer(
        tmp_path, registry, registries_conf, podman_source, indexed):
    src, layers = podman_source
    out, log = lazy_run(tmp_path, registry, registries_conf, src, layers, "src")
    assert out.split() == [DATA_SHA, "/srv/data.txt", "1"]
    for d in layers:
        assert f"{d['digest']}: serving it through gzip index" in log


def test_podman_4_pulls_the_indexed_image_lazily_and_pushes_and_saves_it(
        tmp_path, registry, registries_conf, podman_source, indexed):
    _, layers = podman_source
    dst = indexed
    manifest = get_json(registry, "gzw/indexed", "1")
    assert [d["digest"] for d in manifest["layers"]] == [d["digest"] for d in layers]
    (tmp_path / "als").mkdir()
    mark = registry.mark()
    with StoreProcess(tmp_path / "als", registries_conf=registries_conf, config=NO_BACKGROUND) as store, \
            Podman(tmp_path / "podman", additional_layer_store=store.mountpoint,
                   insecure_registries=[registry.host]) as podman:
        out = podman.run("run", "--rm", dst, *CHECK).stdout
        assert out.split() == [DATA_SHA, "/srv/data.txt", "1"]
        assert full_gets(registry, mark, layers) == []
        log = store.log()
        assert all(f"layer {d['digest']}: in use" in log for d in layers), log[-3000:]
        assert "referrer" not in log  # its annotations named the indexes: no referrers asked for
        # push and save read each layer's `blob` from the store; the result is the same layers
        copy = f"{registry.host}/gzw/pushed:1"
        podman.push(dst, copy)
        pushed = get_json(registry, "gzw/pushed", "1", accept=ACCEPT)
        assert [d["digest"] for d in pushed["layers"]] == [d["digest"] for d in layers]
        archive = tmp_path / "saved.tar"
        podman.run("save", "--format", "oci-archive", "-o", str(archive), dst)
        with tarfile.open(archive) as tf:
            saved = {m.name.rpartition("/")[2] for m in tf.getmembers() if m.name.startswith("blobs/sha256/")}
        assert {d["digest"][7:] for d in layers} <= saved


def test_a_tampered_piece_digest_fails_the_read_with_eio_never_a_wrong_byte(
        tmp_path, registry, registries_conf, podman_source, indexed):
    """DST's second layer re-indexed with the digest of /srv/data.txt's first piece changed: a consistent
    index, accepted as such, whose piece no longer matches; the read fails, nothing else is served in its
    place. (A span's own digest is not what serving checks: each piece has its own.)"""
    _, layers = podman_source
    manifest = get_json(registry, "gzw/indexed", "1")
    desc = manifest["layers"][1]
    index = get_blob(registry, "gzw/indexed", desc["annotations"][GZIP_INDEX_ANNOTATION])
    doc = json.loads(gzip.decompress(index))
    [entry] = [e for e in doc["entries"] if e["name"].lstrip("./") == "srv/data.txt"]
    wrong = "sha256:" + hashlib.sha256(b"not this piece").hexdigest()
    if entry.get("chunkDigests"):
        entry["chunkDigests"][0] = wrong
    else:
        entry["digest"] = wrong
    tampered = gzip.compress(json.dumps(doc).encode())
    digest = "sha256:" + hashlib.sha256(tampered).hexdigest()
    gzindex.parse_index(tampered, digest, layer_digest=desc["digest"], layer_size=desc["size"],
                        max_size=64 << 20, max_entries=1 << 20)  # well formed: only the piece lies
    push_blob(registry, "gzw/tampered", tampered)
    desc["annotations"] = {TOC_DIGEST_ANNOTATION: digest, GZIP_INDEX_ANNOTATION: digest}
    for d in (manifest["config"], *manifest["layers"]):
        mount(registry, "gzw/tampered", d["digest"], "gzw/indexed")
    put_manifest(registry, "gzw/tampered", "1", json.dumps(manifest).encode())
    ref = f"{registry.host}/gzw/tampered:1"
    (tmp_path / "als").mkdir()
    with StoreProcess(tmp_path / "als", registries_conf=registries_conf, config=NO_BACKGROUND) as store, \
            Podman(tmp_path / "podman", additional_layer_store=store.mountpoint,
                   insecure_registries=[registry.host]) as podman:
        res = podman.run("run", "--rm", ref, "sha256sum", "/srv/data.txt", check=False)
        log = store.log()
    assert res.returncode != 0 and "Input/output error" in res.stderr, (res.stdout, res.stderr)
    assert res.stdout.strip() == ""  # no digest of any content: nothing was read
    assert "does not match its digest" in log and f"layer {desc['digest']}: in use" in log


# ---- raw registry writes for the tampered image ------------------------------------------------

def _request(registry, method: str, path: str, data: bytes | None = None, headers: dict | None = None):
    import urllib.request
    req = urllib.request.Request(f"{registry.url}{path}", data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.headers


def push_blob(registry, repo: str, data: bytes) -> None:
    _, headers = _request(registry, "POST", f"/v2/{repo}/blobs/uploads/")
    location = headers["Location"]
    sep = "&" if "?" in location else "?"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = location.split(registry.host, 1)[-1] if "://" in location else location
    _request(registry, "PUT", f"{path}{sep}digest={digest}", data,
             {"Content-Type": "application/octet-stream"})


def mount(registry, repo: str, digest: str, source: str) -> None:
    status, _ = _request(registry, "POST", f"/v2/{repo}/blobs/uploads/?mount={digest}&from={source}")
    assert status == 201


def put_manifest(registry, repo: str, tag: str, data: bytes) -> None:
    _request(registry, "PUT", f"/v2/{repo}/manifests/{tag}", data, {"Content-Type": OCI_MANIFEST})
