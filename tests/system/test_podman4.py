"""Real Podman 4.3.1 pulling and running images through `als serve`.

Evidence of laziness comes from the registry's own access log (bytes it
served), never from timing. Every Podman instance keeps its state in a temp
dir and is torn down by its context manager, even when a test fails.
"""

from __future__ import annotations

import io
import re
import tarfile

import pytest

from als.tools.image import estargz_layer, gzip_layer, push_image
from als.reference import parse_reference
from tests.support import images
from als.tools.podman import Podman

pytestmark = pytest.mark.slow

PRINT1 = ["python3", "-c", "print(1)"]


@pytest.fixture(scope="module")
def python_rootfs():
    return images.python_rootfs_tar().read_bytes()


@pytest.fixture(scope="module")
def python_esgz(registry, client, python_rootfs):
    layer = estargz_layer(io.BytesIO(python_rootfs), chunk_size=1 << 20)
    ref = f"{registry.host}/e2e/python:esgz"
    push_image(client, parse_reference(ref), [layer])
    return ref, layer


@pytest.fixture
def lazy_podman(tmp_path, store, registry):
    with Podman(tmp_path / "podman", additional_layer_store=store.mountpoint,
                insecure_registries=[registry.host]) as p:
        yield p


@pytest.fixture
def plain_podman(tmp_path, registry):
    with Podman(tmp_path / "plain", insecure_registries=[registry.host]) as p:
        yield p


def served(registry, mark, digest):
    return sum(a.written for a in registry.accesses_since(mark) if a.uri.endswith(digest))


def test_run_push_save_and_rmi_through_the_store(lazy_podman, plain_podman, registry, store, python_esgz, tmp_path):
    ref, layer = python_esgz
    mark = registry.mark()
    assert lazy_podman.run("run", "--rm", ref, *PRINT1).stdout.strip() == "1"
    fetched = served(registry, mark, layer.digest)
    assert 0 < fetched < layer.size / 2, f"{fetched} of {layer.size} layer bytes downloaded"
    assert f"layer {layer.digest}: in use" in store.log()

    # The image ID chain equals a normal pull's: info carries the real DiffID.
    inspect = lazy_podman.inspect_image(ref)
    assert inspect["RootFS"]["Layers"] == [layer.diff_id]

    # podman save reads `blob` from byte 0 to the end.
    archive = tmp_path / "saved.tar"
    lazy_podman.run("save", "--format", "oci-archive", "-o", str(archive), ref)
    with tarfile.open(archive) as tf:
        sizes = [m.size for m in tf.getmembers() if m.name.startswith("blobs/")]
    assert max(sizes) >= layer.size / 2  # the layer itself is in the archive

    # podman push of the lazily pulled image, then a normal pull of the copy runs.
    copy = f"{registry.host}/e2e/pushed:1"
    lazy_podman.push(ref, copy)
    assert plain_podman.run("run", "--rm", copy, *PRINT1).stdout.strip() == "1"

    before = store.log().count(f"layer {layer.digest}: released")
    lazy_podman.rmi(ref)
    assert store.log().count(f"layer {layer.digest}: released") > before


def test_multi_layer_tree_is_the_same_as_after_a_normal_pull(lazy_podman, plain_podman, registry, client, store):
    tars = images.tree_image_layers()
    layers = [estargz_layer(io.BytesIO(t), chunk_size=256 << 10) for t in tars]
    ref = f"{registry.host}/e2e/tree:esgz"
    push_image(client, parse_reference(ref), layers)
    cmd = images.tree_listing_command()
    lazy = lazy_podman.run("run", "--rm", ref, *cmd).stdout
    for l in layers:
        assert f"layer {l.digest}: ready" in store.log()
    normal = plain_podman.run("run", "--rm", ref, *cmd).stdout
    lazy, normal = images.parse_tree_listing(lazy), images.parse_tree_listing(normal)
    assert images.diff_listings(normal, lazy) == []
    assert images.diff_listings(images.expected_tree(), lazy) == []


def test_plain_gzip_image_is_declined_and_pulled_normally(lazy_podman, registry, client, store, python_rootfs):
    layer = gzip_layer(python_rootfs)
    ref = f"{registry.host}/e2e/python:gzip"
    push_image(client, parse_reference(ref), [layer])
    mark = registry.mark()
    assert lazy_podman.run("run", "--rm", ref, *PRINT1).stdout.strip() == "1"
    assert served(registry, mark, layer.digest) >= layer.size  # downloaded whole, by Podman
    assert re.search(rf"layer {layer.digest}: declined: .*not served lazily|layer {layer.digest}: declined",
                     store.log())


def test_podman_partial_pull_accepts_our_estargz(tmp_path, registry, python_esgz):
    """Podman's own eStargz reader checks our TOC and every chunk digest."""
    ref, layer = python_esgz
    with Podman(tmp_path / "partial", insecure_registries=[registry.host], partial_pulls=True) as podman:
        res = podman.run("--log-level=debug", "pull", ref)
        assert f"Retrieved partial blob {layer.digest}" in res.stderr, "Podman did not take the partial-pull path"
        assert podman.run("run", "--rm", ref, *PRINT1).stdout.strip() == "1"
