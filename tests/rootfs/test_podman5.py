"""`als mount` with Podman 5.4 (trixie) and 5.8 (sid), from their chroots: `--rootfs DIR:O` needs no
containers/storage state, so it works where 5.5 and later lose additional-store layers."""

from __future__ import annotations

import subprocess

import pytest

from tests.rootfs.conftest import als, finish, is_mount_point, listing, start_containers
from tests.support import images, podman5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=list(podman5.SUITES))
def chroot(request):
    return podman5.ensure_chroot(request.param)


@pytest.fixture
def p5(chroot, mounted, registry, tmp_path):
    # DIR's parent, bound at the same path: the overlay on DIR comes along (a recursive bind).
    with podman5.Podman5(chroot, tmp_path / "p5", insecure_registries=[registry.host],
                         binds=[podman5.Bind(mounted.dir.parent)]) as p:
        yield p


def test_rootfs_in_podman5(p5, mounted, tree, rootfs_store):
    ref = tree[0]
    run = ["run", "--rm", "--rootfs", f"{mounted.dir}:O"]
    lazy = listing(p5, *run[2:])
    assert images.diff_listings(images.expected_tree(), lazy) == []
    assert images.diff_listings(listing(p5, "--entrypoint", "", "--user", "0:0", ref), lazy) == []
    # Writes stay in the container's overlay.
    assert p5.run(*run, "/bin/sh", "-c", "echo new > /tree/small.txt; rm /tree/big.bin; cat /tree/small.txt"
                  ).stdout == "new\n"
    assert (mounted.dir / "tree/small.txt").read_text() == "hello, tree\n" and (mounted.dir / "tree/big.bin").exists()
    # The printed arguments behave like the image.
    assert p5.run("run", "--rm", *mounted.args).stdout == p5.run("run", "--rm", ref).stdout
    # A container in Podman's own mount namespace (pivoted into the chroot) holds the umount off.
    procs = start_containers(p5, mounted.dir, ["echo started; sleep 3; cat /tree/small.txt"])
    try:
        refused = als(rootfs_store, "umount", str(mounted.dir), check=False)
        assert refused.returncode == 1 and "overlay lower directory" in refused.stderr, refused.stderr
    finally:
        assert finish(procs) == ["hello, tree\n"]
    als(rootfs_store, "umount", str(mounted.dir))
    assert not is_mount_point(mounted.dir)


def test_print_args_in_a_real_shell(p5, mounted, tree):
    """What the README shows: mapfile, then the array into podman run."""
    script = 'mapfile -t args < <(printf %s "$PRINTED"); exec "$@" "${args[@]}"'
    res = subprocess.run(["bash", "-c", script, "bash", *p5.command("run", "--rm")],
                         env={**p5.env, "PRINTED": mounted.printed}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout == p5.run("run", "--rm", tree[0]).stdout
