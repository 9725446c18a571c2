"""Rootless `als mount` with real Podman 4.3.1: the store, the mount and the containers all in Podman's namespaces.

The user runs the store inside `podman unshare` (as for the storage.conf
way), and `als mount` inside `podman unshare` too; the store mounts the
overlay in its own user and mount namespaces, which are the ones the user's
Podman keeps alive in its pause process and joins for every `podman run`. The
ids the store reports are mapped through that user namespace, so the files
are owned as after a normal rootless pull (not 65534, as a root store's would
be), and the overlay needs `userxattr` there (or the opaque directory would
not hide what it hides).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from tests.rootfs.conftest import CMD, finish, is_mount_point, push_tree, start_containers
from tests.support import images
from tests.support.rootless import CONTAINERS_CONF, RootlessUser, UnshareStore, make_user

pytestmark = pytest.mark.slow


@pytest.fixture
def user():
    with make_user("als-rf") as u:
        yield u


class UserPodman:
    """The user's rootless Podman, as start_containers and finish drive it."""

    def __init__(self, user: RootlessUser):
        self.user = user

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return self.user.run(["podman", *args], timeout=300)

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return self.user.popen(["podman", *args], **kw)


def test_rootless_rootfs_with_the_store_in_podman_unshare(user, registry, client):
    ref = f"{registry.host}/rootless/rootfs:esgz"
    push_tree(client, ref)
    # No storage.conf entry: this way needs none. Podman and the store read the same registries.conf.
    user.write(".config/containers/containers.conf", CONTAINERS_CONF)
    user.write(".config/containers/registries.conf", f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n')
    root, target = user.home / ".local/share/als", user.home / "rootfs"
    for d in (root / "store", target):  # directories the user owns
        user.write(str((d / ".keep").relative_to(user.home)), "").unlink()
    config = user.write(".config/als/config.toml", "[fetch]\nbackground = false\n")
    podman = UserPodman(user)
    store = UnshareStore(user, root, root / "store", config).start()
    try:
        args = store.als("mount", "--print-args", ref, str(target)).stdout.splitlines()
        assert args[-3:] == ["--rootfs", f"{target}:O", CMD]
        # The overlay is in Podman's mount namespace (with userxattr), not in the host's.
        info = user.run(["podman", "unshare", "grep", f" {target} ", "/proc/self/mountinfo"]).stdout
        assert " overlay " in info and "userxattr" in info, info
        assert not is_mount_point(target) and list(target.iterdir()) == []

        lazy = images.parse_tree_listing(podman.run("run", "--rm", "--rootfs", f"{target}:O",
                                                    *images.tree_listing_command()).stdout)
        assert images.diff_listings(images.expected_tree(), lazy) == []
        owners = {(s.uid, s.gid) for s in lazy.values()}
        assert {(0, 0), (1000, 1000), (0, 1000), (65534, 65534)} <= owners  # mapped, not all "nobody"
        # A normal rootless pull of the same image lists the same, but for its device nodes: containers/storage
        # skips those in a user namespace (mknod is not allowed there), the image's own files show them.
        pulled = images.parse_tree_listing(podman.run("run", "--rm", "--entrypoint", "", "--user", "0:0", ref,
                                                      *images.tree_listing_command()).stdout)
        devices = {p for p, s in lazy.items() if s.type in ("b", "c")}
        assert devices == {"blockdev", "chardev"}
        assert images.diff_listings({p: s for p, s in lazy.items() if p not in devices}, pulled) == []
        # The printed arguments behave like the image.
        assert podman.run("run", "--rm", *args).stdout == podman.run("run", "--rm", ref).stdout

        # Writes (as the image's user 1000, and as root in the container) stay in the container's overlay.
        script = ("touch /tree/newfile && echo new > /tree/small.txt && rm /tree/big.bin && mkdir /tree/d "
                  "&& cat /tree/small.txt && ls /tree/newfile")
        out = podman.run("run", "--rm", "--user", "0:0", "--rootfs", f"{target}:O", "/bin/sh", "-c", script).stdout
        assert out == "new\n/tree/newfile\n"
        seen = user.run(["podman", "unshare", "sh", "-c", f"cd {target}/tree && cat small.txt && ls"]).stdout
        assert seen.startswith("hello, tree\n") and "big.bin" in seen.split()
        assert "newfile" not in seen.split() and "d" not in seen.split()

        # A running container holds `als umount` off; then it unmounts, from outside `podman unshare` too.
        procs = start_containers(podman, target, ["echo started; sleep 4; cat /tree/small.txt"])
        try:
            refused = store.als("umount", str(target), unshare=False, check=False)
            assert refused.returncode == 1 and "overlay lower directory" in refused.stderr, refused.stderr
        finally:
            assert finish(procs) == ["hello, tree\n"]
        store.als("umount", str(target), unshare=False)
        gone = user.run(["podman", "unshare", "grep", f" {target} ", "/proc/self/mountinfo"], check=False)
        assert gone.returncode == 1, gone.stdout
        assert json.loads(store.als("status", "--json").stdout)["rootfs"] == []

        # Podman's pause process holds its namespaces; once it stops (as `podman system migrate` stops it),
        # `podman unshare` makes new ones, where nothing of the store is seen: `als mount` refuses.
        (pause,) = [p for p in user.pids() if open(f"/proc/{p}/cmdline", "rb").read().startswith(b"catatonit\0")]
        assert os.readlink(f"/proc/{pause}/ns/mnt") == os.readlink(f"/proc/{store.pid()}/ns/mnt")
        os.kill(pause, signal.SIGKILL)
        refused = store.als("mount", ref, str(target), check=False)
        assert refused.returncode == 1 and "stop the store and start it again in `podman unshare`" in refused.stderr
        assert json.loads(store.als("status", "--json", unshare=False).stdout)["rootfs"] == []
    finally:
        store.stop()
        user.run(["podman", "system", "reset", "--force"], check=False, timeout=120)
    assert "unmounted" in store.log(), store.log()[-3000:]
