"""What the kernel offers for keeping a FUSE connection across a daemon restart (README, "Restarts").

Not a feature of als (see the README for why it is not implemented): these
tests pin down the kernel facts that section states, on this machine.
A copy of the daemon's /dev/fuse descriptor is taken with pidfd_getfd(2), as
a supervisor or systemd's file descriptor store would hold it; the daemon is
killed with reads in flight; the mount stays alive, new requests queue, and
FUSE_NOTIFY_RESEND puts the reads the dead daemon had taken back in the
queue, where a successor reading the descriptor finds them. The node ids in
those requests are the dead daemon's own, from its memory.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
import subprocess
import threading
import time

import pytest

from tests.support.registry import RegistryProcess
from tests.support.restart import push_tree
from tests.support.store_process import StoreProcess, force_unmount, write_registries_conf

SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438  # x86_64 and aarch64 share these numbers
FUSE_NOTIFY_RESEND = 7  # Linux >= 6.9
FUSE_READ, FUSE_FORGET, FUSE_BATCH_FORGET = 15, 2, 42
RESENT = 1 << 63  # the kernel marks re-sent requests in their unique id


def grab_fuse_fd(pid: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
            pidfd = libc.syscall(SYS_PIDFD_OPEN, pid, 0)
            if pidfd < 0:
                pytest.skip(f"pidfd_open: {os.strerror(ctypes.get_errno())}")
            try:
                mine = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fd), 0)
            finally:
                os.close(pidfd)
            if mine < 0:
                pytest.skip(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
            return mine
    raise AssertionError("the daemon holds no /dev/fuse descriptor")


def test_a_held_descriptor_keeps_the_mount_and_resend_requeues_inflight_reads(tmp_path):
    with RegistryProcess(tmp_path / "registry") as registry:
        conf = write_registries_conf(tmp_path / "registries.conf", [registry.host])
        ref, layers = push_tree(registry, conf, "handover:1", 256 << 10)
        (tmp_path / "store").mkdir()
        store = StoreProcess(tmp_path / "store", registries_conf=conf,
                             config="[fetch]\nbackground = false\n[registry]\nretries = 0\nread_timeout = 120.0\n"
                                    "[fuse]\nxattr_free_mount = false\nkeep_connection = false\n")  # one connection: the one grabbed
        store.start()
        held = cat = None
        stopped = False
        try:
            top = store.layer_dir(ref, layers[0].digest)
            assert (top / "diff/tree/small.txt").read_bytes() == b"hello, tree\n"
            held = grab_fuse_fd(store.proc.pid)
            os.kill(registry.proc.pid, signal.SIGSTOP)  # the next range request hangs in the daemon
            stopped = True
            cat = subprocess.Popen(["cat", str(top / "diff/tree/big.bin")], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and "reading /tree/big.bin" not in store.log():
                time.sleep(0.05)
            time.sleep(0.5)
            assert cat.poll() is None

            store.kill()
            time.sleep(0.3)
            assert cat.poll() is None  # not ENOTCONN: the connection lives while a descriptor does
            result: dict[str, str] = {}

            def readdir():
                try:
                    os.listdir(top / "diff/tree/dir")
                    result["r"] = "ok"
                except OSError as e:
                    result["r"] = e.strerror

            t = threading.Thread(target=readdir, daemon=True)
            t.start()
            t.join(0.5)
            assert "r" not in result  # queued for a daemon that may come back

            try:
                os.write(held, struct.pack("<IiQ", 16, FUSE_NOTIFY_RESEND, 0))
            except OSError as e:
                pytest.skip(f"this kernel has no FUSE_NOTIFY_RESEND: {e}")
            os.set_blocking(held, False)
            seen: list[tuple[int, int, int]] = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and (cat.poll() is None or "r" not in result):
                try:
                    buf = os.read(held, (1 << 20) + 8192)
                except BlockingIOError:
                    time.sleep(0.02)
                    continue
                _, opcode, unique, nodeid = struct.unpack_from("<IIQQ", buf)
                seen.append((opcode, unique, nodeid))
                if opcode not in (FUSE_FORGET, FUSE_BATCH_FORGET):
                    os.write(held, struct.pack("<IiQ", 16, -errno.EIO, unique))  # a successor's answer
            resent_reads = [s for s in seen if s[0] == FUSE_READ and s[1] & RESENT]
            assert resent_reads, seen  # the reads the dead daemon had taken came back
            assert cat.wait(10) != 0 and b"Input/output error" in cat.stderr.read()
            t.join(5)
            assert result["r"] == "Input/output error"

            os.close(held)
            held = None
            time.sleep(0.2)
            with pytest.raises(OSError) as e:
                os.listdir(store.mountpoint)
            assert e.value.errno == errno.ENOTCONN  # the last descriptor gone: the connection ends
        finally:
            if stopped and registry.proc:
                os.kill(registry.proc.pid, signal.SIGCONT)
            if held is not None:
                os.close(held)
            if cat is not None and cat.poll() is None:
                cat.kill()
                cat.wait(10)
            store.stop()
            force_unmount(store.mountpoint)
