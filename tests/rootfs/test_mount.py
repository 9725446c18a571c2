"""`als mount` against a real store, without Podman: layer stacking corner cases, stopping the store."""

from __future__ import annotations

import io
import json
import subprocess

import pytest

from als.errors import ALSError
from als.reference import parse_reference
from als.rootfs import overlay
from als.tools.image import estargz_layer, image_config, push_image
from tests.rootfs.conftest import als, is_mount_point
from tests.support import images
from tests.support.store_process import StoreProcess


def test_one_layer_and_a_repeated_layer(rootfs_store, registry, client, tmp_path):
    a = estargz_layer(io.BytesIO(images.files_tar({"f": b"a\n", "only_a": b"x\n"})), chunk_size=1 << 20)
    b = estargz_layer(io.BytesIO(images.files_tar({"f": b"b\n"})), chunk_size=1 << 20)
    one = f"{registry.host}/rootfs/one:esgz"
    push_image(client, parse_reference(one), [a])
    # a, b, a: the top copy of a wins, as for a pull (the kernel refuses the same lower twice)
    rep = f"{registry.host}/rootfs/repeated:esgz"
    push_image(client, parse_reference(rep), [a, b, a], image_config([a, b, a]))
    for ref, want in ((one, b"a\n"), (rep, b"a\n")):
        target = tmp_path / ref.rsplit("/", 1)[1].replace(":", "-")
        target.mkdir()
        out = als(rootfs_store, "mount", ref, str(target)).stdout
        try:
            assert "mounted: image" in out
            assert (target / "f").read_bytes() == want and (target / "only_a").read_bytes() == b"x\n"
            assert sorted(p.name for p in target.iterdir()) == ["f", "only_a"]
            again = als(rootfs_store, "mount", ref, str(target)).stdout  # the same again: nothing new
            assert again.startswith("already mounted")
        finally:
            als(rootfs_store, "umount", str(target))
    st = json.loads(als(rootfs_store, "status", "--json").stdout)
    assert st["rootfs"] == []
    assert [l["uses"] for i in st["images"] if i["ref"] == rep for l in i["layers"]] == [0, 0]


def test_refusals_name_the_problem(rootfs_store, registry, tmp_path):
    missing = als(rootfs_store, "mount", f"{registry.host}/rootfs/none:1", str(tmp_path), check=False)
    assert missing.returncode == 1 and "rootfs/none:1" in missing.stderr
    assert not is_mount_point(tmp_path)
    inside = als(rootfs_store, "mount", f"{registry.host}/rootfs/none:1", str(rootfs_store.mountpoint), check=False)
    assert "inside or above the store's mount" in inside.stderr
    notours = als(rootfs_store, "umount", str(tmp_path), check=False)
    assert notours.returncode == 1 and "is not a root file system mounted by this store" in notours.stderr


def test_stopping_the_store_detaches_its_root_file_systems(registries_conf, registry, client, tmp_path):
    ref = f"{registry.host}/rootfs/stop:esgz"
    push_image(client, parse_reference(ref), [estargz_layer(io.BytesIO(images.files_tar({"f": b"f\n"})),
                                                            chunk_size=1 << 20)])
    target = tmp_path / "rootfs"
    target.mkdir()
    (tmp_path / "als").mkdir()
    store = StoreProcess(tmp_path / "als", registries_conf=registries_conf).start()
    try:
        als(store, "mount", ref, str(target))
        assert (target / "f").read_bytes() == b"f\n"
        assert store.stop() == 0
        assert not is_mount_point(target)  # no dead overlay left at DIR
        assert f"image {ref}: root file system at {target} detached as the store stops" in store.log()
        store.start()  # the next run says the mount is gone
        assert f"the root file system of image {ref} at {target} did not survive the restart" in store.log()
        assert json.loads(als(store, "status", "--json").stdout)["rootfs"] == []
    finally:
        store.stop()
        if is_mount_point(target):
            subprocess.run(["umount", "-l", str(target)], timeout=30)


@pytest.mark.real  # mounts (root), with no helper the tiers would recognise
def test_both_mount_methods_merge_with_the_top_layer_first(tmp_path):
    top, bottom = tmp_path / "top", tmp_path / "bot:tom"  # a ':' needs no escaping either way
    for d, files in ((top, {"f": "top"}), (bottom, {"f": "bottom", "g": "g"})):
        d.mkdir()
        for name, text in files.items():
            (d / name).write_text(text)
    for legacy in (False, True):
        target = tmp_path / f"m{int(legacy)}"
        target.mkdir()
        method = overlay.mount_overlay(target, [top, bottom], legacy=legacy)
        try:
            assert method == ("mount(2)" if legacy else "lowerdir+")
            assert (target / "f").read_text() == "top" and (target / "g").read_text() == "g"
            with pytest.raises(OSError):
                (target / "new").write_text("x")  # read-only
        finally:
            overlay.unmount(target)
        assert not is_mount_point(target)


def test_limits_are_named(tmp_path):
    with pytest.raises(ALSError, match="at most 500"):
        overlay.mount_overlay(tmp_path, [tmp_path] * 501)
    with pytest.raises(ALSError, match="at least two"):
        overlay.mount_overlay(tmp_path, [tmp_path])
