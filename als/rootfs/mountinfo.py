"""Who uses a root file system mount: overlays stacked on it and bind mounts of it, in any mount namespace.

The kernel lets an overlay's lower directory be unmounted under it (the
overlay holds private references), so `als umount` cannot count on EBUSY to
learn that a container still runs on DIR. Podman's ``--rootfs DIR:O`` mounts
an overlay whose ``lowerdir`` is DIR: that, or any mount of DIR's own
superblock (a bind of it), in this or another mount namespace (a chroot'ed
or rootless Podman has its own), is a user.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

_OCTAL = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of /proc/PID/mountinfo, unescaped."""

    mount_id: int
    device: str  # "major:minor" of the superblock
    root: str  # the directory of that file system mounted here
    mount_point: str
    fstype: str
    source: str
    super_options: str


def unescape(field: str) -> str:
    """The kernel writes space, tab, newline, backslash (and, in options, ',' and '=') as \\ooo."""
    raw = os.fsencode(field)
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), raw))


def parse(text: str) -> list[Mount]:
    """The mounts of a mountinfo file; lines that do not parse are left out."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            mounts.append(Mount(mount_id=int(fields[0]), device=fields[2], root=unescape(fields[3]),
                                mount_point=unescape(fields[4]), fstype=fields[sep + 1],
                                source=unescape(fields[sep + 2]), super_options=fields[sep + 3]))
        except (ValueError, IndexError):
            continue
    return mounts


def _split(text: str, sep: str) -> list[str]:
    """Split at ``sep`` except where a backslash escapes it (the backslash is dropped)."""
    parts, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i + 1] if text[i + 1] in (sep, "\\") else text[i:i + 2])
            i += 2
            continue
        if c == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def lower_dirs(super_options: str) -> list[str]:
    """An overlay's lower directories from its super options, topmost first.

    ``lowerdir=A:B`` as given to mount(2) (``\\:`` for a ':' in a name; a
    ``::`` separates data-only layers), or one ``lowerdir+=`` per directory
    as the new mount API shows them; ``datadir+`` ones too.
    """
    out: list[str] = []
    for option in super_options.split(","):
        key, eq, value = option.partition("=")
        if not eq:
            continue
        key, value = unescape(key), unescape(value)
        if key == "lowerdir":
            out += [p for p in _split(value, ":") if p]
        elif key in ("lowerdir+", "datadir+"):
            out.append(value)
    return out


@dataclass(frozen=True)
class User:
    """A mount that rests on a root file system mount."""

    pid: int  # a process of the mount namespace it was seen in
    mount_point: str  # as that namespace sees it
    how: str  # "overlay lower directory" or "bind mount"

    def describe(self) -> str:
        return f"{self.mount_point} ({self.how}, mount namespace of pid {self.pid})"


def own_namespace() -> str:
    """This process's mount namespace, as the kernel names it ("mnt:[4026532247]")."""
    return os.readlink("/proc/self/ns/mnt")


def _namespaces() -> dict[str, int]:
    """One process of each mount namespace we can see, this process's own first."""
    seen = {own_namespace(): os.getpid()}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            seen.setdefault(os.readlink(f"/proc/{name}/ns/mnt"), int(name))
        except OSError:
            continue  # gone, or not ours to look at
    return seen


def _is_mount(pid: int, path: str, device: tuple[int, int]) -> bool:
    """Whether ``path``, as process ``pid`` sees it, is on the mount ``device`` (a name alone could be
    another directory in another namespace)."""
    try:
        st = os.stat(path if pid == os.getpid() else f"/proc/{pid}/root{path}")
    except OSError:
        return False
    return (os.major(st.st_dev), os.minor(st.st_dev)) == device


def users_in(mounts: list[Mount], target: str, device: tuple[int, int], pid: int = 0,
             confirm: Callable[[str], bool] = lambda _path: True) -> list[User]:
    """The mounts among ``mounts`` (one namespace's, seen by process ``pid``) that rest on ``target``,
    a root file system mounted with ``device``. ``confirm(path)``: whether a lower directory named
    ``target`` is really it in that namespace (the same name may be another directory there)."""
    found: list[User] = []
    dev = f"{device[0]}:{device[1]}"
    for m in mounts:
        if m.device == dev:
            # At DIR itself it is the mount, or its copy in a namespace made after it (unshare, a
            # service's private mounts): a copy, not a user. Anywhere else it is a bind of it.
            if m.mount_point != target:
                found.append(User(pid, m.mount_point, "bind mount"))
        elif (m.fstype == "overlay" and target in map(os.path.normpath, lower_dirs(m.super_options))
              and confirm(target)):
            found.append(User(pid, m.mount_point, "overlay lower directory"))
    return found


def users(target: str, device: tuple[int, int]) -> list[User]:
    """The mounts resting on ``target`` (see ``users_in``) in every mount namespace we can read:
    Podman runs containers in namespaces of its own (a chroot'ed or rootless one, or a wrapper's)."""
    found: list[User] = []
    for pid in _namespaces().values():
        try:
            mounts = parse(Path(f"/proc/{pid}/mountinfo").read_text())
        except OSError:
            continue
        found += users_in(mounts, target, device, pid, lambda path, pid=pid: _is_mount(pid, path, device))
    return found
