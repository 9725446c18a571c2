"""systemd's readiness protocol (sd_notify), spoken directly over $NOTIFY_SOCKET.

With ``Type=notify`` systemd starts the units ordered after ours (Podman,
CRI-O) only once we say ``READY=1``, and we say it only once the kernel has
sent FUSE INIT, that is, once the store is mounted: an engine started earlier
would find an empty directory and pull every layer in full. The protocol is
one datagram of ``KEY=value`` lines to a unix socket named by the environment
(``@name`` is the abstract namespace), so no library is needed. Outside systemd
the variable is unset and every call is a no-op.
"""

from __future__ import annotations

import array
import logging
import os
import socket

log = logging.getLogger("als.notify")


def _address(name: str) -> str | bytes:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def _socket_name() -> str:
    name = os.environ.get("NOTIFY_SOCKET", "")
    return name if name.startswith("/") or name.startswith("@") else ""


def store_fds(name: str, fds: list[int]) -> bool:
    """Hand ``fds`` to systemd's file descriptor store under ``name`` (``FDSTORE=1``, ``FDNAME=``).

    systemd keeps them while the unit restarts (``FileDescriptorStoreMax=`` must
    allow them) and passes them to the next start in ``$LISTEN_FDS``. True if a
    manager took them.
    """
    address = _socket_name()
    if not address:
        return False
    message = f"FDSTORE=1\nFDNAME={name}".encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))], 0,
                      _address(address))
    except OSError as e:
        log.warning("cannot hand descriptors %s to the service manager: %s", name, e)
        return False
    return True


def remove_fds(name: str) -> bool:
    """Have systemd close and forget the descriptors stored under ``name``."""
    return notify(fdstoreremove=1, fdname=name)


def listen_fds() -> dict[str, list[int]]:
    """The descriptors systemd passed to this process (``$LISTEN_FDS``, from fd 3), by name.

    Only for this process (``$LISTEN_PID``); the variables are removed so that
    children do not take them for theirs. Every descriptor is made close-on-exec.
    """
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
        pid = int(os.environ.get("LISTEN_PID", "0"))
    except ValueError:
        return {}
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if pid != os.getpid() or count <= 0:
        return {}
    out: dict[str, list[int]] = {}
    for i in range(count):
        fd = 3 + i
        os.set_inheritable(fd, False)
        out.setdefault(names[i] if i < len(names) else "unknown", []).append(fd)
    return out


def notify(**fields: str | int) -> bool:
    """Send ``KEY=value`` lines (e.g. ``READY=1``, ``STATUS=...``); True if a manager heard it.

    Keys are given in lower case and sent upper case: ``notify(ready=1, status="mounted")``.
    Failures are logged and never raised: readiness reporting must not stop the store.
    """
    name = _socket_name()
    if not name:
        return False
    message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message, _address(name))
    except OSError as e:
        log.warning("cannot tell the service manager %s: %s", message.decode(errors="replace"), e)
        return False
    return True
