"""`als mount` with Podman 5.4 (trixie) and 5.8 (sid), from their chroots: `--rootfs DIR:O` needs no
containers/storage state, so it works where 5.5 and later lose additional-store layers."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.rootfs.conftest import als, finish, is_mount_point, listing, push_tree, start_containers
from tests.support import images, podman5
from tests.support.rootless import CONTAINERS_CONF
from tests.support.store_process import REPO

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


def test_rootless_rootfs_in_podman5(chroot, registry, client, tmp_path):
    """The rootless way (see test_rootless.py) with the chroot's Podman: the store and `als mount` in
    `podman unshare`, then `podman run --rootfs DIR:O` as the user."""
    if podman5.userns_blocked():
        pytest.skip(f"no user namespaces for unprivileged users: {podman5.userns_blocked()}")
    ref = f"{registry.host}/rootless/rootfs-{chroot.suite}:esgz"
    push_tree(client, ref)
    with podman5.RootlessUser5(chroot, tmp_path / "user", binds=[podman5.Bind(REPO, "/opt/als", True)]) as user:
        user.write(".config/containers/containers.conf", CONTAINERS_CONF)
        user.write(".config/containers/registries.conf",
                   f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n')
        config = user.write(".config/als/config.toml", "[fetch]\nbackground = false\n")
        root, target = f"{user.home}/.local/share/als", f"{user.home}/rootfs"
        user.write(".local/share/als/store/.keep", "")
        user.write("rootfs/.keep", "")
        for d in ("rootfs", ".local/share/als/store"):
            (user.host_home / d / ".keep").unlink()
        log_path = tmp_path / "als.log"

        def user_als(*args: str) -> subprocess.CompletedProcess:
            return user.run(["podman", "unshare", "python3", "-m", "als", args[0], "--root", root, *args[1:]],
                            env={"PYTHONPATH": "/opt/als"}, check=False)

        with open(log_path, "wb") as log:
            user.popen(["podman", "unshare", "python3", "-m", "als", "serve", "--root", root, "--config", config,
                        mountpoint := f"{root}/store"], env={"PYTHONPATH": "/opt/als"},
                       stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while f"store mounted at {mountpoint}" not in log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
            time.sleep(0.1)
        mounted = user_als("mount", ref, target)
        assert mounted.returncode == 0, mounted.stderr
        run = ["podman", "run", "--rm", "--rootfs", f"{target}:O"]
        lazy = images.parse_tree_listing(user.run([*run, *images.tree_listing_command()]).stdout)
        assert images.diff_listings(images.expected_tree(), lazy) == []  # owners mapped, opaque dir applied
        out = user.run([*run, "/bin/sh", "-c", "echo new > /tree/small.txt; rm /tree/big.bin; cat /tree/small.txt"])
        assert out.stdout == "new\n"
        seen = user.run(["podman", "unshare", "sh", "-c", f"cat {target}/tree/small.txt; ls {target}/tree"]).stdout
        assert seen.startswith("hello, tree\n") and "big.bin" in seen.split()
        unmounted = user_als("umount", target)
        assert unmounted.returncode == 0, unmounted.stderr
        assert user.run(["podman", "unshare", "grep", f" {target} ", "/proc/self/mountinfo"], check=False
                        ).returncode == 1
    # close() killed the namespace: the user's processes, the store among them, and its mounts are gone
