"""Podman 5 (Debian trixie: 5.4, sid: 5.8) and a gzip image indexed by `als index`, through `als serve`.

The source image is Podman's own: `podman import` of a root file system and
`podman push`, by the suite's Podman 5. Podman >= 5.1 asks an additional
layer store only about layers with a TOC annotation, looked up by its value:
DST carries the index digest under the eStargz key (and ours), so it is
pulled lazily, the registry sending Podman its config and no layer. SRC has
no annotation: Podman pulls it normally (it never asks the store), and it
runs. Both run on the same store, each on a fresh Podman. Laziness is judged
by the registry's log: a normal pull's GET sends a whole layer blob, which
none of the store's range requests does (they start at a checkpoint past the
gzip header).
"""

from __future__ import annotations

import pytest

from als.formats.estargz import TOC_DIGEST_ANNOTATION
from als.oci import GZIP_INDEX_ANNOTATION
from tests.conftest import NO_BACKGROUND
from tests.support import images, podman5
from tests.support.alsrun import get_json, run_als
from tests.support.store_process import StoreProcess

pytestmark = pytest.mark.slow

PRINT1 = ["python3", "-c", "print(1)"]


def full_gets(registry, mark: int, layers: list[dict]) -> list[str]:
    """Requests since ``mark`` that sent a whole layer blob (a normal pull's)."""
    sizes = {d["digest"]: d["size"] for d in layers}
    return [a.uri for a in registry.accesses_since(mark)
            if any(a.uri.endswith(d) and a.written >= s for d, s in sizes.items())]


@pytest.mark.parametrize("suite", ["trixie", "sid"])
def test_the_indexed_image_is_pulled_lazily_and_its_source_normally(suite, registry, registries_conf, tmp_path):
    chroot = podman5.ensure_chroot(suite)
    src, dst = f"{registry.host}/gzw5/src-{suite}:1", f"{registry.host}/gzw5/indexed-{suite}:1"
    rootfs = images.python_rootfs_tar()
    with podman5.Podman5(chroot, tmp_path / "builder", insecure_registries=[registry.host],
                         binds=[podman5.Bind(rootfs, read_only=True)]) as builder:
        builder.import_tar(rootfs, "localhost/gzw5/src:1")
        builder.push("localhost/gzw5/src:1", src, timeout=300)
    res = run_als("index", src, dst, conf=registries_conf)
    assert res.returncode == 0, res.stderr
    manifest = get_json(registry, f"gzw5/indexed-{suite}", "1")
    layers = manifest["layers"]
    keys = [d["annotations"][GZIP_INDEX_ANNOTATION] for d in layers]
    assert keys == [d["annotations"][TOC_DIGEST_ANNOTATION] for d in layers]

    (tmp_path / "als").mkdir()
    with StoreProcess(tmp_path / "als", registries_conf=registries_conf, config=NO_BACKGROUND) as store:
        mark = registry.mark()
        with podman5.Podman5(chroot, tmp_path / "lazy", additional_layer_store=store.mountpoint,
                             insecure_registries=[registry.host]) as podman:
            assert podman.run("run", "--rm", dst, *PRINT1, timeout=180).stdout.strip() == "1"
        assert full_gets(registry, mark, layers) == []  # the config only, from Podman
        assert any(a.uri.endswith(manifest["config"]["digest"]) for a in registry.accesses_since(mark))
        log = store.log()
        for key in keys:  # asked by the annotation's value, and served
            assert f"layer {key}: in use" in log, log[-3000:]

        mark, at = registry.mark(), len(store.log())
        with podman5.Podman5(chroot, tmp_path / "normal", additional_layer_store=store.mountpoint,
                             insecure_registries=[registry.host]) as podman:
            assert podman.run("run", "--rm", src, *PRINT1, timeout=180).stdout.strip() == "1"
        assert len(full_gets(registry, mark, layers)) == len(layers)  # pulled normally
        assert not any(f"layer {d['digest']}: in use" in store.log()[at:] for d in layers)
