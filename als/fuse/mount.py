"""Mounting and unmounting a FUSE file system: the /dev/fuse descriptor a session serves.

Apart from the session because it is the one part that needs privileges
(mount(2), or the setuid fusermount3) and runs once, before any request.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import stat
import subprocess
from pathlib import Path

from als.fuse.abi import MAX_PAGES_COUNT

log = logging.getLogger("als.fuse")

MS_RDONLY, MNT_DETACH = 1, 2

_libc = ctypes.CDLL(None, use_errno=True)


def mount(mountpoint: Path, read_only: bool = False, allow_other: bool = True) -> int:
    """Mount an empty FUSE file system at ``mountpoint``; returns the /dev/fuse descriptor to serve.

    mount(2) works as root and inside a user namespace that owns its mount
    namespace (`podman unshare`); elsewhere fusermount3 mounts and passes back
    the descriptor, as libfuse does. ``read_only`` also spares a round trip:
    the kernel marks a file's access time stale after reading it from the
    daemon, and asks for it again on the next stat, unless the mount is
    read-only.
    """
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = ["default_permissions", f"max_read={MAX_PAGES_COUNT * 4096}"] + (["allow_other"] if allow_other else [])
    data = ",".join([f"fd={fd}", f"rootmode={stat.S_IFDIR:o}", f"user_id={os.getuid()}",
                     f"group_id={os.getgid()}"] + opts)
    flags = MS_RDONLY if read_only else 0
    if _libc.mount(b"als", os.fsencode(mountpoint), b"fuse.als", flags, data.encode()) == 0:
        return fd
    err = ctypes.get_errno()
    os.close(fd)
    if err not in (errno.EPERM, errno.EACCES):
        raise OSError(err, f"mounting FUSE on {mountpoint}: {os.strerror(err)}")
    return _fusermount(mountpoint, ["fsname=als", "subtype=als"] + (["ro"] if read_only else []) + opts)


def _fusermount(mountpoint: Path, opts: list[str]) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        try:
            r = subprocess.run(["fusermount3", "-o", ",".join(opts), "--", str(mountpoint)], env=env,
                               pass_fds=(theirs.fileno(),), capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise OSError(errno.EPERM, f"mounting FUSE on {mountpoint} with fusermount3: {e}") from None
        if r.returncode != 0:
            raise OSError(errno.EPERM, f"fusermount3 could not mount {mountpoint}: {r.stderr.strip()}")
        theirs.close()
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise OSError(errno.EPERM, f"fusermount3 mounted {mountpoint} but passed no descriptor")
    return fds[0]


def unmount(mountpoint: Path) -> None:
    """Detach the mount: in-flight users keep it until they let go, new ones no longer see it."""
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) == 0:
        return
    try:
        subprocess.run(["fusermount3", "-u", "-z", "--", str(mountpoint)], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("unmounting %s failed: %s", mountpoint, e)
