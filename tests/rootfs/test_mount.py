"""`als mount` against a real store, without Podman: layer stacking corner cases, stopping the store."""

from __future__ import annotations

import io
import json
import signal
import subprocess

import pytest

from als.errors import ALSError
from als.oci import OCI_INDEX, OCI_MANIFEST
from als.reference import parse_reference
from als.rootfs import overlay
from als.store.platforms import host_platform
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


def own_store(registries_conf, registry, client, tmp_path, repo: str, files: dict[str, bytes]):
    """A store of this test's own, an image of ``files`` pushed as ``repo``, and an empty target directory."""
    ref = f"{registry.host}/{repo}:esgz"
    push_image(client, parse_reference(ref), [estargz_layer(io.BytesIO(images.files_tar(files)),
                                                            chunk_size=1 << 20)])
    target = tmp_path / "rootfs"
    target.mkdir()
    (tmp_path / "als").mkdir()
    return ref, target, StoreProcess(tmp_path / "als", registries_conf=registries_conf).start()


def test_stopping_the_store_for_good_detaches_its_root_file_systems(registries_conf, registry, client, tmp_path):
    ref, target, store = own_store(registries_conf, registry, client, tmp_path, "rootfs/stop", {"f": b"f\n"})
    try:
        als(store, "mount", ref, str(target))
        assert (target / "f").read_bytes() == b"f\n"
        assert store.stop(signal.SIGINT) == 0  # for good: the FUSE mounts go, so must what rests on them
        assert not is_mount_point(target)  # no dead overlay left at DIR
        assert f"image {ref}: root file system at {target} detached as the store stops" in store.log()
        store.start()  # the next run says the mount is gone
        assert f"the root file system of image {ref} at {target} did not survive the restart" in store.log()
        assert json.loads(als(store, "status", "--json").stdout)["rootfs"] == []
    finally:
        store.stop(signal.SIGINT)
        if is_mount_point(target):
            subprocess.run(["umount", "-l", str(target)], timeout=30)


def test_a_restart_with_the_connection_kept_leaves_root_file_systems_to_the_next_store(
        registries_conf, registry, client, tmp_path):
    ref, target, store = own_store(registries_conf, registry, client, tmp_path, "rootfs/restart",
                                   {"a": b"a\n", "b": b"b\n"})
    try:
        if "FUSE connections kept by" not in store.log():
            pytest.skip("this kernel cannot hand a FUSE connection over (FUSE_NOTIFY_RESEND, Linux 6.9)")
        als(store, "mount", ref, str(target))
        dev = target.stat().st_dev
        assert (target / "a").read_bytes() == b"a\n"
        assert store.hand_over() == 0  # SIGTERM: the mounts stay for the next store
        assert is_mount_point(target) and target.stat().st_dev == dev
        assert "detached as the store stops" not in store.log()
        assert f"image {ref}: root file system at {target} left to the next store" in store.log()
        store.start()
        assert f"image {ref}: root file system at {target} taken over from the previous store" in store.log()
        assert (target / "b").read_bytes() == b"b\n"  # never read before: served by the successor
        status = json.loads(als(store, "status", "--json").stdout)
        assert [m["dir"] for m in status["rootfs"]] == [str(target)]
        als(store, "umount", str(target))
        assert not is_mount_point(target)
    finally:
        store.stop(signal.SIGINT)
        if is_mount_point(target):
            subprocess.run(["umount", "-l", str(target)], timeout=30)


@pytest.mark.real  # mounts (root), with no helper the tiers would recognise
def test_both_mount_methods_merge_with_the_top_layer_first(tmp_path):
    top, bottom = tmp_path / "top", tmp_path / "bot:tom"  # a ':' needs no escaping either way
    middle = tmp_path / ("m" * 200) / "a path longer than the 255 bytes fsconfig(2) takes"
    assert len(str(middle)) > 255
    for d, files in ((top, {"f": "top"}), (middle, {"h": "h"}), (bottom, {"f": "bottom", "g": "g"})):
        d.mkdir(parents=True)
        for name, text in files.items():
            (d / name).write_text(text)
    for legacy in (False, True):
        target = tmp_path / f"m{int(legacy)}"
        target.mkdir()
        method = overlay.mount_overlay(target, [top, middle, bottom], legacy=legacy)
        try:
            assert method == ("mount(2)" if legacy else "lowerdir+")
            assert (target / "f").read_text() == "top" and (target / "g").read_text() == "g"
            assert (target / "h").read_text() == "h"
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


def push_two_platforms(client, ref: str) -> dict[str, bytes]:
    """An index of linux/amd64 and linux/arm64/v8 images with a common base layer and a top layer of
    their own (its file "arch" names the platform); what /arch holds, by platform."""
    base = estargz_layer(io.BytesIO(images.files_tar({"base": b"base\n"})), chunk_size=1 << 20)
    manifests, arch_file = [], {}
    for platform in ("linux/amd64", "linux/arm64/v8"):
        os_name, arch, *variant = platform.split("/")
        arch_file[platform] = f"{platform}\n".encode()
        layers = [base, estargz_layer(io.BytesIO(images.files_tar({"arch": arch_file[platform]})),
                                      chunk_size=1 << 20)]
        one = parse_reference(f"{ref}-{arch}")
        digest = push_image(client, one, layers, image_config(layers, arch=arch))
        manifests.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": len(client.get_manifest(one).data),
                          "platform": {"os": os_name, "architecture": arch,
                                       **({"variant": variant[0]} if variant else {})}})
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
    client.put_manifest(parse_reference(ref), index, OCI_INDEX)
    return arch_file


def test_platform_picks_one_image_of_an_index(rootfs_store, registries_conf, registry, client, tmp_path):
    ref = f"{registry.host}/rootfs/multi:esgz"
    arch_file = push_two_platforms(client, ref)
    host = "/".join(filter(None, host_platform()))
    other = next(p for p in arch_file if p != host)  # the host's is one of the two (amd64 or arm64 hosts)

    def mounted_arch(store, target, *platform: str) -> bytes:
        target.mkdir()
        als(store, "mount", *platform, ref, str(target))
        try:
            assert sorted(p.name for p in target.iterdir()) == ["arch", "base"]
            return (target / "arch").read_bytes()
        finally:
            als(store, "umount", str(target))

    for platform in arch_file:
        assert mounted_arch(rootfs_store, tmp_path / platform.replace("/", "-"), "--platform", platform) \
            == arch_file[platform]
    assert mounted_arch(rootfs_store, tmp_path / "default") == arch_file[host]  # the store's default: the host's
    # A store configured for another platform picks that one by default.
    (tmp_path / "als").mkdir()
    with StoreProcess(tmp_path / "als", registries_conf=registries_conf,
                      config=f'[resolve]\nplatform = "{other}"\n') as store:
        assert mounted_arch(store, tmp_path / "configured") == arch_file[other]

    target = tmp_path / "none"
    target.mkdir()
    for platform, said in (("linux/s390x", f"image {ref} has no manifest for linux/s390x "
                                           "(it has: linux/amd64, linux/arm64/v8)"),
                           ("amd64", "platform 'amd64' is not os/arch[/variant]")):
        res = als(rootfs_store, "mount", "--platform", platform, ref, str(target), check=False)
        assert res.returncode == 1 and said in res.stderr, res.stderr
        assert not is_mount_point(target) and list(target.iterdir()) == []
    assert json.loads(als(rootfs_store, "status", "--json").stdout)["rootfs"] == []
