"""Mounting a read-only overlayfs over an image's layer directories, and taking it down.

With no upper directory the kernel merges the lower ones read-only and
applies their whiteouts and opaque directories, which is how Podman itself
presents a pulled image. Linux >= 6.8 takes the lower directories one by one
through the new mount API (``fsconfig(lowerdir+)``): no escaping and no page
limit, at most 500 of them (the kernel's stacking limit); a path of 256 bytes or
more (a long image reference, pinned to a digest, makes one) goes by a
``/proc/self/fd/N`` name. Older kernels get
mount(2) with ``lowerdir=/proc/self/fd/N:...`` (short names for long paths
that would not fit the one page mount(2) copies), which holds about 200.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from pathlib import Path

from als.errors import ALSError

log = logging.getLogger("als.rootfs")

MAX_LOWER = 500  # OVL_MAX_STACK
PAGE = 4096  # what mount(2) copies of its data argument
FSCONFIG_MAX_STRING = 256  # fsconfig(2) copies a value of at most 255 bytes and a NUL

# The new mount API: the same numbers on every architecture (asm-generic).
SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 429, 430, 431, 432
FSOPEN_CLOEXEC = 1
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
FSMOUNT_CLOEXEC, MOUNT_ATTR_RDONLY, MOVE_MOUNT_F_EMPTY_PATH = 1, 1, 4
AT_FDCWD = -100
MS_RDONLY, MNT_DETACH = 1, 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class OverlayError(ALSError):
    """The kernel refused the overlay; the message carries its own words."""


class _NoLowerdirPlus(Exception):
    """This kernel has no ``lowerdir+`` (before 6.8): use mount(2)."""


def _check(rc: int, what: str, fsfd: int | None = None) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        said = _kernel_log(fsfd) if fsfd is not None else ""
        raise OSError(err, f"{what}: {os.strerror(err)}{f' ({said})' if said else ''}")
    return rc


def _kernel_log(fsfd: int) -> str:
    """The messages the kernel left on a file system context ("e overlay: too many lower ...")."""
    lines = []
    for _ in range(32):
        try:
            lines.append(os.read(fsfd, 4096).decode(errors="replace").strip())
        except OSError:
            break
    return "; ".join(line.partition(" ")[2] or line for line in lines if line)


def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace (rootless, `podman unshare`)."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def mount_overlay(target: Path, lowers: list[Path], *, userxattr: bool | None = None, legacy: bool = False) -> str:
    """Mount ``lowers`` (topmost first, at least two) read-only on ``target``; returns the method used.

    ``userxattr`` (default: when in a user namespace) makes the kernel read
    whiteouts and opaque markers from ``user.overlay.*``: an overlay in a user
    namespace ignores ``trusted.overlay.opaque`` and would show the files an
    opaque directory hides. The store serves both. ``legacy``: mount(2) even where
    ``lowerdir+`` exists (what older kernels get).
    """
    if len(lowers) < 2:
        raise OverlayError("an overlay with no upper directory needs at least two lower directories")
    if len(lowers) > MAX_LOWER:
        raise OverlayError(f"{len(lowers)} layers: the kernel stacks at most {MAX_LOWER} lower directories")
    if userxattr is None:
        userxattr = in_user_namespace()
    try:
        if not legacy:
            _mount_new_api(target, lowers, userxattr)
            return "lowerdir+"
    except _NoLowerdirPlus:
        pass
    _mount_with_fds(target, lowers, userxattr)
    return "mount(2)"


def _mount_new_api(target: Path, lowers: list[Path], userxattr: bool) -> None:
    fsfd = _libc.syscall(SYS_FSOPEN, b"overlay", FSOPEN_CLOEXEC)
    if fsfd < 0:
        if ctypes.get_errno() == errno.ENOSYS:
            raise _NoLowerdirPlus()
        _check(fsfd, "fsopen(overlay)")
    fds: list[int] = []
    try:
        for i, lower in enumerate(lowers):
            name = os.fsencode(lower)
            if len(name) >= FSCONFIG_MAX_STRING:
                # The kernel takes at most 255 bytes per value (EINVAL beyond): name it by a short
                # /proc/self/fd link instead, resolved right here (the mount table then shows that name).
                try:
                    fds.append(os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
                except OSError as e:
                    raise OverlayError(f"cannot open the layer directory {lower}: {e.strerror}") from None
                name = f"/proc/self/fd/{fds[-1]}".encode()
            rc = _libc.syscall(SYS_FSCONFIG, fsfd, FSCONFIG_SET_STRING, b"lowerdir+", name, 0)
            if rc < 0 and i == 0 and ctypes.get_errno() == errno.EINVAL and "lowerdir+" in _kernel_log(fsfd):
                raise _NoLowerdirPlus()  # "overlay: Unknown parameter 'lowerdir+'"
            try:
                _check(rc, f"layer directory {lower}", fsfd)
            except OSError as e:
                raise OverlayError(f"cannot stack {lower}: {e.strerror}") from None
        try:
            for flag in ("ro", *(["userxattr"] if userxattr else [])):
                _check(_libc.syscall(SYS_FSCONFIG, fsfd, FSCONFIG_SET_FLAG, flag.encode(), None, 0), flag, fsfd)
            _check(_libc.syscall(SYS_FSCONFIG, fsfd, FSCONFIG_CMD_CREATE, None, None, 0), "creating it", fsfd)
            mfd = _check(_libc.syscall(SYS_FSMOUNT, fsfd, FSMOUNT_CLOEXEC, MOUNT_ATTR_RDONLY), "fsmount", fsfd)
        except OSError as e:
            raise OverlayError(f"the kernel refused the overlay of {len(lowers)} layers: {e.strerror}") from None
        try:
            _check(_libc.syscall(SYS_MOVE_MOUNT, mfd, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH),
                   f"moving it to {target}")
        except OSError as e:
            raise OverlayError(f"cannot mount the overlay on {target}: {e.strerror}") from None
        finally:
            os.close(mfd)
    finally:
        os.close(fsfd)
        for fd in fds:
            os.close(fd)


def fd_lowerdir_option(fds: list[int], userxattr: bool) -> str:
    """mount(2)'s data for lower directories open as ``fds`` (topmost first): short, and no ':' in them."""
    return ",".join(["lowerdir=" + ":".join(f"/proc/self/fd/{fd}" for fd in fds),
                     *(["userxattr"] if userxattr else [])])


def _mount_with_fds(target: Path, lowers: list[Path], userxattr: bool) -> None:
    fds: list[int] = []
    try:
        for lower in lowers:
            fds.append(os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        data = fd_lowerdir_option(fds, userxattr)
        if len(data) >= PAGE:
            raise OverlayError(f"{len(lowers)} layers do not fit in the {PAGE} bytes mount(2) takes on this "
                               f"kernel (before Linux 6.8); about 200 do")
        if _libc.mount(b"overlay", os.fsencode(target), b"overlay", MS_RDONLY, data.encode()) != 0:
            err = ctypes.get_errno()
            raise OverlayError(f"the kernel refused the overlay of {len(lowers)} layers on {target}: "
                               f"{os.strerror(err)} (its reason is in dmesg)")
    except OSError as e:
        raise OverlayError(f"cannot open a layer directory: {e}") from None
    finally:
        for fd in fds:
            os.close(fd)


def unmount(target: Path, *, detach: bool = False) -> None:
    """Unmount ``target``; ``detach``: lazily (MNT_DETACH), for a mount that is busy or must go now."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH if detach else 0) != 0:
        err = ctypes.get_errno()
        raise OverlayError(f"cannot unmount {target}: {os.strerror(err)}"
                           + (" (a process has its working directory or files open in it)"
                              if err == errno.EBUSY else ""))
