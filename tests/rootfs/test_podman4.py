"""`als mount` with real Podman 4.3.1: `podman run --rootfs DIR:O` on an image's lazily served root file system."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess

import pytest

from als.reference import parse_reference
from als.tools.image import estargz_layer, gzip_layer, push_image
from als.tools.podman import Podman
from tests.rootfs.conftest import CMD, Rootfs, als, finish, is_mount_point, listing, served, start_containers
from tests.support import images

pytestmark = pytest.mark.slow


@pytest.fixture
def podman(tmp_path, registry):
    with Podman(tmp_path / "podman", insecure_registries=[registry.host]) as p:
        yield p


def test_rootfs_shows_what_a_pulled_container_sees(mounted, podman, tree):
    lazy = listing(podman, "--rootfs", f"{mounted.dir}:O")
    assert images.diff_listings(images.expected_tree(), lazy) == []
    normal = listing(podman, "--entrypoint", "", "--user", "0:0", tree[0])  # a normal pull of the image
    assert images.diff_listings(normal, lazy) == []


def test_rootfs_fetches_only_what_containers_read(rootfs_store, podman, registry, client, tmp_path):
    files = {"data/a.bin": os.urandom(2 << 20), "data/b.bin": os.urandom(2 << 20), "data/small": b"small\n"}
    layers = [estargz_layer(io.BytesIO(images.busybox_layer()), chunk_size=512 << 10),
              estargz_layer(io.BytesIO(images.files_tar(files)), chunk_size=512 << 10)]
    ref = f"{registry.host}/rootfs/lazy:esgz"
    push_image(client, parse_reference(ref), layers)
    data = layers[1]
    mark = registry.mark()
    r = Rootfs(rootfs_store, ref, tmp_path / "lazy")
    try:
        run = ["run", "--rm", "--rootfs", f"{r.dir}:O"]
        assert podman.run(*run, "cat", "/data/small").stdout == "small\n"
        podman.run(*run, "ls", "-lR", "/")
        looked = served(registry, mark, [data.digest])
        print(f"fetched to mount, list and read a small file: {looked} of {data.size} bytes")
        assert looked < data.size / 4, f"{looked} of {data.size} bytes fetched to mount, list and read a small file"
        first = podman.run(*run, "/bin/sh", "-c", "head -c 1 /data/a.bin | od -An -tx1").stdout.split()
        assert first == [files["data/a.bin"][:1].hex()]
        one = served(registry, mark, [data.digest]) - looked
        assert 0 < one < 1 << 20, f"{one} bytes fetched for the first byte of a file of 512 KiB chunks"
        assert podman.run(*run, "sha256sum", "/data/a.bin").stdout.split()[0] == hashlib.sha256(
            files["data/a.bin"]).hexdigest()
        total = served(registry, mark, [data.digest])
        # The tail read when the layer was resolved (TOC, data/small, the end of b.bin) and a.bin:
        # at least half of b.bin was never fetched.
        assert total < data.size - (1 << 20), f"{total} of {data.size} bytes fetched: b.bin too"
    finally:
        r.close()


def test_writes_land_in_the_container_overlay_only(mounted, podman):
    script = ("touch /tree/newfile && echo new > /tree/small.txt && rm /tree/big.bin && mkdir -p /etc/x "
              "&& cat /tree/small.txt && ls /tree/newfile")
    out = podman.run("run", "--rm", "--rootfs", f"{mounted.dir}:O", "/bin/sh", "-c", script).stdout
    assert out == "new\n/tree/newfile\n"
    assert not (mounted.dir / "tree/newfile").exists() and not (mounted.dir / "etc").exists()
    assert (mounted.dir / "tree/small.txt").read_text() == "hello, tree\n"
    assert (mounted.dir / "tree/big.bin").stat().st_size == 3 * images.CHUNK + 17
    # Another container starts from the image again.
    assert listing(podman, "--rootfs", f"{mounted.dir}:O") == images.expected_tree()


def test_printed_args_make_podman_run_behave_like_podman_run_image(mounted, podman, tree):
    ref = tree[0]
    assert mounted.args[-3:] == ["--rootfs", f"{mounted.dir}:O", CMD]
    # What a user types, in bash: mapfile, then the array expanded into podman run.
    script = 'mapfile -t args < <(printf %s "$PRINTED"); exec "$@" "${args[@]}"'
    res = subprocess.run(["bash", "-c", script, "bash", *podman.command("run", "--rm")], env={
        **podman.env, "PRINTED": mounted.printed}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    image_run = podman.run("run", "--rm", ref).stdout
    assert res.stdout == image_run
    assert "uid=1000 gid=1000" in res.stdout and "\n/tree\n" in res.stdout and "FOO=bar baz\n" in res.stdout
    # --no-cmd leaves the command to the user; the entrypoint (sh -c) still applies.
    own = als(mounted.store, "mount", "--print-args", "--no-cmd", ref, str(mounted.dir)).stdout.splitlines()
    assert own[-2:] == ["--rootfs", f"{mounted.dir}:O"]
    assert podman.run("run", "--rm", *own, "echo mine; pwd").stdout == "mine\n/tree\n"


def test_two_containers_share_one_mount_and_umount_waits_for_them(mounted, podman, rootfs_store):
    procs = start_containers(podman, mounted.dir, [f"echo c{i} > /tree/who; echo started; sleep 5; cat /tree/who"
                                                   for i in range(2)])
    try:
        refused = als(rootfs_store, "umount", str(mounted.dir), check=False)
        assert refused.returncode == 1 and refused.stderr.count("overlay lower directory") == 2, refused.stderr
        # at least the two containers' overlays (a copy of one in another mount namespace may add to them)
        assert re.search(r"is in use by ([2-9]|\d\d+) mount\(s\)", refused.stderr) and "--force" in refused.stderr, \
            refused.stderr
        assert is_mount_point(mounted.dir)
    finally:
        outs = finish(procs)
    assert outs == ["c0\n", "c1\n"]  # each container saw its own write only
    als(rootfs_store, "umount", str(mounted.dir))
    assert not is_mount_point(mounted.dir)
    assert json.loads(als(rootfs_store, "status", "--json").stdout)["rootfs"] == []


def test_umount_force_detaches_under_a_running_container(mounted, podman, rootfs_store):
    procs = start_containers(podman, mounted.dir, ["echo started; sleep 4; cat /tree/small.txt"])
    try:
        forced = als(rootfs_store, "umount", "--force", str(mounted.dir))
        assert "detached from" in forced.stdout and "overlay lower directory" in forced.stdout, forced.stdout
        assert not is_mount_point(mounted.dir)
    finally:
        outs = finish(procs)
    assert outs == ["hello, tree\n"]  # the container kept its files


def test_status_lists_the_mount_and_keeps_its_layers_in_use(mounted, rootfs_store, tree):
    ref, layers = tree
    text = als(rootfs_store, "status").stdout
    assert str(mounted.dir) in text and ref in text, text
    st = json.loads(als(rootfs_store, "status", "--json").stdout)
    (m,) = st["rootfs"]
    assert m["dir"] == str(mounted.dir) and m["image"] == ref and m["layers"] == [l.digest for l in layers]
    uses = {l["digest"]: l["uses"] for i in st["images"] if i["ref"] == ref for l in i["layers"]}
    assert all(uses[l.digest] >= 1 for l in layers), uses
    als(rootfs_store, "umount", str(mounted.dir))
    st = json.loads(als(rootfs_store, "status", "--json").stdout)
    uses = {l["digest"]: l["uses"] for i in st["images"] if i["ref"] == ref for l in i["layers"]}
    assert all(uses[l.digest] == 0 for l in layers), uses
    assert st["rootfs"] == [] and not is_mount_point(mounted.dir)


def test_gzip_image_is_refused_naming_the_layer(rootfs_store, registry, client, tmp_path):
    tars = images.tree_image_layers()
    layers = [estargz_layer(io.BytesIO(tars[0]), chunk_size=256 << 10), gzip_layer(tars[1])]
    ref = f"{registry.host}/rootfs/mixed:gzip"
    push_image(client, parse_reference(ref), layers)
    target = tmp_path / "gz"
    target.mkdir()
    res = als(rootfs_store, "mount", ref, str(target), check=False)
    assert res.returncode == 1
    assert f"layer 2 of 2 {layers[1].digest}" in res.stderr and "nothing was mounted" in res.stderr, res.stderr
    assert layers[0].digest not in res.stderr
    assert not is_mount_point(target) and list(target.iterdir()) == []
    st = json.loads(als(rootfs_store, "status", "--json").stdout)
    assert st["rootfs"] == []
    uses = [l["uses"] for i in st["images"] if i["ref"] == ref for l in i["layers"]]
    assert uses and all(u == 0 for u in uses), uses
