"""A store that dies or restarts hands its live FUSE connection to the next one: readers never notice.

Real mounts of `als serve` and a real registry. A read is blocked on the
network (the registry is SIGSTOPped) when the store is killed with SIGKILL;
the next store takes the connection over (no new mount), has the kernel
re-send that read (FUSE_NOTIFY_RESEND), and it completes with the right bytes.
Descriptors opened before the crash on files never read, and directories
looked up before it, are served by node ids the new store never handed out.
Both keepers: the holder process (no systemd), and systemd's file descriptor
store, spoken by the test itself (``FDSTORE=1`` in, ``$LISTEN_FDS`` out).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from als.ops.holder import SOCKET_NAME
from tests.support import images
from tests.support.alsrun import run_als
from tests.support.registry import RegistryProcess
from tests.support.restart import FakeSystemd, kernel_can_resend, push_tree
from tests.support.store_process import (StoreProcess, force_unmount, is_mounted, wait_log,
                                         write_registries_conf)

CONFIG = "[fetch]\nbackground = false\npredict = false\n[registry]\nretries = 0\nread_timeout = 120.0\n"
BIG = images.tree_layer_entries()[0][8]  # /tree/big.bin, 3 MiB + 17 bytes in 1 MiB chunks
assert BIG.path.endswith("big.bin")


pytestmark = pytest.mark.skipif(not kernel_can_resend(), reason="FUSE_NOTIFY_RESEND needs Linux 6.9")


class Reader(threading.Thread):
    """Reads a file whole in a thread: its bytes, or the error it got."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.data, self.error = path, None, None
        self.start()

    def run(self):
        try:
            with open(self.path, "rb") as f:
                self.data = f.read()
        except OSError as e:
            self.error = e


@pytest.fixture
def image(tmp_path):
    with RegistryProcess(tmp_path / "registry") as registry:
        conf = write_registries_conf(tmp_path / "registries.conf", [registry.host])
        ref, layers = push_tree(registry, conf, "takeover:1", 1 << 20)
        yield registry, conf, ref, layers


def crash_with_a_read_in_flight(store, registry, top, restart):
    """Kill the store while a read waits for the registry; ``restart()`` brings the next store.

    Returns what was opened and looked up before the crash, for the checks after it.
    """
    diff = top / "diff/tree"
    assert (diff / "small.txt").read_bytes() == b"hello, tree\n"
    unread = open(diff / "setgid_file", "rb")  # opened, never read: its reads name a node id only
    listed = sorted(os.listdir(diff / "dir"))
    os.kill(registry.proc.pid, signal.SIGSTOP)  # the next range request hangs in the store
    try:
        reader = Reader(diff / "big.bin")
        wait_log(store, "reading /tree/big.bin")
        time.sleep(0.3)
        store.kill()
        time.sleep(0.3)
        assert reader.is_alive()  # not ENOTCONN: the kept descriptor keeps the connection
    finally:
        os.kill(registry.proc.pid, signal.SIGCONT)
    restart()
    reader.join(60)
    assert not reader.is_alive() and reader.error is None, reader.error
    assert hashlib.sha256(reader.data).hexdigest() == hashlib.sha256(BIG.data).hexdigest()
    return unread, listed


def check_after(diff, unread, listed):
    assert unread.read() == b"#!/bin/sh\necho setgid\n"  # READ of a node id from before the crash
    unread.close()
    assert sorted(os.listdir(diff / "dir")) == listed
    assert (diff / "small.txt").read_bytes() == b"hello, tree\n"
    assert (diff / "new_in_3").exists() is False  # a lower layer: nothing from elsewhere
    assert (diff / "dir/inner.txt").read_bytes() == b"inner\n"


def test_the_holder_keeps_the_connection_across_a_crash_and_a_planned_restart(tmp_path, image):
    registry, conf, ref, layers = image
    (tmp_path / "s").mkdir()
    store = StoreProcess(tmp_path / "s", registries_conf=conf, config=CONFIG)
    store.start()
    holder_pid = None
    try:
        wait_log(store, "FUSE connections kept by the connection holder")
        holder_pid = int(store.log().split("connection holder (pid ")[1].split(")")[0])
        dev = os.stat(store.mountpoint).st_dev
        top = store.layer_dir(ref, layers[0].digest)
        unread, listed = crash_with_a_read_in_flight(store, registry, top, store.start)
        assert "taking over the live FUSE connections" in store.log()
        assert "clearing the stale mount" not in store.log()
        assert os.stat(store.mountpoint).st_dev == dev  # the same mount
        check_after(top / "diff/tree", unread, listed)
        st = json.loads(run_als("status", "--root", str(store.root), "--json", conf=conf).stdout)
        assert st["connections"] == {"kept_by": "holder", "holder_pid": holder_pid}  # the successor knows it

        # ---- a planned restart: SIGTERM, then the next store; a read in the gap waits for it ----
        store.proc.send_signal(signal.SIGTERM)
        store.proc.wait(20)
        store.proc = None
        assert is_mounted(store.mountpoint)
        reader = Reader(top / "diff/tree/xattr_file")  # never read: it waits for the next store
        time.sleep(0.3)
        assert reader.is_alive()
        store.start()
        reader.join(30)
        assert reader.data == b"has xattrs\n", reader.error
        assert store.log().count("taking over the live FUSE connections") == 2
        os.kill(holder_pid, 0)  # the same holder throughout
    finally:
        store.stop(signal.SIGINT)  # for good: unmounts, and the holder ends with its connections
        force_unmount(store.mountpoint)
    assert not is_mounted(store.mountpoint)
    if holder_pid is not None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(f"/proc/{holder_pid}"):
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{holder_pid}") or "Z" in open(f"/proc/{holder_pid}/stat").read().split()[2]
    assert not (store.root / SOCKET_NAME).exists()


def test_systemd_keeps_the_connection_and_passes_it_back_in_listen_fds(tmp_path, image):
    registry, conf, ref, layers = image
    (tmp_path / "s").mkdir()
    systemd = FakeSystemd(tmp_path / "notify.sock")
    store = StoreProcess(tmp_path / "s", registries_conf=conf, config=CONFIG, env={"NOTIFY_SOCKET": str(systemd.path)})
    store.start()
    try:
        systemd.restart_with_stored_fds(store)
        assert not (store.root / SOCKET_NAME).exists()  # no holder under systemd
        top = store.layer_dir(ref, layers[0].digest)
        unread, listed = crash_with_a_read_in_flight(store, registry, top, store.start)
        assert "kept by systemd's file descriptor store: no new mount" in store.log()
        check_after(top / "diff/tree", unread, listed)
    finally:
        store.stop(signal.SIGINT)
        systemd.close()  # the last copies: the connection ends
        force_unmount(store.mountpoint)
    assert not is_mounted(store.mountpoint)


def test_without_a_kept_connection_a_dead_mount_is_cleared_as_before(tmp_path, image):
    registry, conf, ref, layers = image
    (tmp_path / "s").mkdir()
    store = StoreProcess(tmp_path / "s", registries_conf=conf, config=CONFIG + "[fuse]\nkeep_connection = false\n")
    store.start()
    try:
        top = store.layer_dir(ref, layers[0].digest)
        assert (top / "diff/tree/small.txt").read_bytes() == b"hello, tree\n"
        store.kill()
        with pytest.raises(OSError):
            os.statvfs(store.mountpoint)  # ENOTCONN at once: nothing keeps the connection
        store.start()
        assert "fuse.keep_connection is off: mounting afresh" in store.log()
        assert "clearing the stale mount" in store.log()
        assert (top / "diff/tree/small.txt").read_bytes() == b"hello, tree\n"
    finally:
        store.stop()
    assert not is_mounted(store.mountpoint)
    assert subprocess.run(["pgrep", "-f", str(store.root / SOCKET_NAME)], capture_output=True).returncode == 1


def test_the_holder_ends_the_connection_when_no_store_comes_back(tmp_path, image):
    """After its grace the holder ends the connections itself: waiting readers fail, nothing hangs."""
    registry, conf, ref, layers = image
    (tmp_path / "s").mkdir()
    store = StoreProcess(tmp_path / "s", registries_conf=conf, config=CONFIG + "[fuse]\nrestart_grace = 2.0\n")
    store.start()
    holder_pid = None
    try:
        wait_log(store, "FUSE connections kept by the connection holder")
        holder_pid = int(store.log().split("connection holder (pid ")[1].split(")")[0])
        top = store.layer_dir(ref, layers[0].digest)
        assert (top / "diff/tree/small.txt").read_bytes() == b"hello, tree\n"
        store.kill()
        reader = Reader(top / "diff/tree/xattr_file")  # never read: it waits for a store that never comes
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and os.path.exists(f"/proc/{holder_pid}") \
                and "Z" not in open(f"/proc/{holder_pid}/stat").read().split()[2]:
            time.sleep(0.1)
        holder_state = open(f"/proc/{holder_pid}/stat").read().split()[2] if os.path.exists(f"/proc/{holder_pid}") else "gone"
        assert holder_state in ("Z", "gone"), f"the holder is still running ({holder_state})"
        reader.join(10)
        assert not reader.is_alive() and reader.data is None and reader.error is not None
        assert not is_mounted(store.mountpoint)
    finally:
        if holder_pid is not None and os.path.exists(f"/proc/{holder_pid}"):
            os.kill(holder_pid, signal.SIGKILL)
        store.stop(signal.SIGINT)
        force_unmount(store.mountpoint)
    assert not is_mounted(store.mountpoint)
