"""A running container of a lazily pulled image keeps working while the store crashes and restarts.

Real Podman and a real registry. A container is started lazily and left
running (`sleep`); the store is killed with SIGKILL while a read of the
container waits for the registry (stopped with SIGSTOP) and started again,
then restarted as planned (SIGTERM, then a successor, with a read made in the
gap). The FUSE connection is kept by the holder process and taken over each
time, so the container never sees the store go: the read in flight completes
with the right bytes, files it never read before are served after each
restart with the right bytes, a file read before the crash is still served,
and the mount is never cleared. Both keepers: the holder process, and
systemd's file descriptor store (its protocol spoken by the test, since
systemd cannot run here).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from als.tools.podman import Podman
from tests.support import images
from tests.support.registry import RegistryProcess
from tests.support.restart import FakeSystemd, kernel_can_resend, podman_on, push_tree
from tests.support.store_process import StoreProcess, is_mounted, wait_log, write_registries_conf

pytestmark = pytest.mark.slow

# No background fetch and no prediction: "never read" stays true until the container reads it.
CONFIG = "[fetch]\nbackground = false\npredict = false\n[fuse]\nkeep_connection = true\n"


def sha256_in(podman: Podman, name: str, path: str) -> str:
    return podman.run("exec", name, "sha256sum", path, timeout=120).stdout.split()[0]


def in_container(podman: Podman, name: str, *cmd: str) -> subprocess.Popen:
    """``podman exec NAME CMD`` started, not waited for."""
    return podman.popen("exec", name, *cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(podman: Podman, proc: subprocess.Popen, timeout: float = 120) -> str:
    """The output of a command started by ``in_container``, which must succeed."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        podman._kill_group(proc)
        proc.communicate()
        raise
    assert proc.returncode == 0, err
    return out


def running(podman: Podman, name: str) -> bool:
    return podman.run("inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "true"


@pytest.mark.skipif(not kernel_can_resend(), reason="taking a FUSE connection over needs Linux 6.9")
@pytest.mark.parametrize("keeper", ["holder", "systemd"])
def test_a_running_container_keeps_its_files_across_a_crash_and_a_planned_restart(tmp_path, keeper):
    expected = images.expected_tree()
    with RegistryProcess(tmp_path / "registry") as registry:
        conf = write_registries_conf(tmp_path / "registries.conf", [registry.host])
        ref, _ = push_tree(registry, conf, "live/tree:esgz", 256 << 10, images.tree_image_layers, retries=1)

        (tmp_path / "store").mkdir()
        # systemd cannot run here: the test speaks its side of the protocol (FDSTORE=1 in, $LISTEN_FDS out)
        systemd = FakeSystemd(tmp_path / "notify.sock") if keeper == "systemd" else None
        store = StoreProcess(tmp_path / "store", registries_conf=conf, config=CONFIG,
                             env={"NOTIFY_SOCKET": str(systemd.path)} if systemd else None)
        store.start()
        try:
            if systemd:
                systemd.restart_with_stored_fds(store)
            kept_by = "systemd's file descriptor store" if systemd else "the connection holder"
            assert f"FUSE connections kept by {kept_by}" in store.log()
            with podman_on(store, tmp_path / "podman", registry) as podman:
                podman.pull(ref)
                podman.run("run", "-d", "--name", "live", ref, "sleep", "3600")
                assert podman.run("exec", "live", "cat", "/tree/small.txt").stdout == "hello, tree\n"
                dev = os.stat(store.mountpoint).st_dev

                # ---- crash: SIGKILL while a read of the container waits for the registry (stopped) ----
                # The holder keeps the connection, the next store takes it over and answers that read.
                os.kill(registry.proc.pid, signal.SIGSTOP)
                try:
                    blocked = in_container(podman, "live", "sha256sum", "/tree/new_in_3")  # never read before
                    wait_log(store, "reading /tree/new_in_3", 60.0)
                    store.kill()
                    time.sleep(0.5)
                    assert blocked.poll() is None  # still waiting: no ENOTCONN, no SIGBUS
                finally:
                    os.kill(registry.proc.pid, signal.SIGCONT)
                assert is_mounted(store.mountpoint)
                store.start()
                out = finish(podman, blocked)
                assert out.split()[0] == expected["new_in_3"].sha256
                assert "taking over the live FUSE connections" in store.log()
                assert "clearing the stale mount" not in store.log()
                assert os.stat(store.mountpoint).st_dev == dev  # the same mount: the container's overlay rests on it
                assert running(podman, "live")
                assert sha256_in(podman, "live", "/tree/modified") == expected["modified"].sha256  # never read before
                assert podman.run("exec", "live", "cat", "/tree/small.txt").stdout == "hello, tree\n"  # read before

                # ---- a planned restart: SIGTERM, a read in the gap waits for the successor ----------------
                assert store.hand_over() == 0
                assert "left the mounts on" in store.log()
                gap = in_container(podman, "live", "sha256sum", "/tree/big.bin")
                time.sleep(1.0)  # the exec starts and its read reaches the kernel while no store runs
                store.start()
                assert finish(podman, gap).split()[0] == expected["big.bin"].sha256
                assert store.log().count("taking over the live FUSE connections") == 2
                assert "clearing the stale mount" not in store.log()
                assert sha256_in(podman, "live", "/tree/dir/inner.txt") == expected["dir/inner.txt"].sha256
                assert podman.run("exec", "live", "cat", "/tree/small.txt").stdout == "hello, tree\n"
                assert running(podman, "live")
        finally:
            store.stop(signal.SIGINT)  # for good: unmounts, and the holder ends with its connections
            if systemd:
                systemd.close()
