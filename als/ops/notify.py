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

import logging
import os
import socket

log = logging.getLogger("als.notify")


def _address(name: str) -> str | bytes:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def notify(**fields: str | int) -> bool:
    """Send ``KEY=value`` lines (e.g. ``READY=1``, ``STATUS=...``); True if a manager heard it.

    Keys are given in lower case and sent upper case: ``notify(ready=1, status="mounted")``.
    Failures are logged and never raised: readiness reporting must not stop the store.
    """
    name = os.environ.get("NOTIFY_SOCKET", "")
    if not name or not (name.startswith("/") or name.startswith("@")):
        return False
    message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message, _address(name))
    except OSError as e:
        log.warning("cannot tell the service manager %s: %s", message.decode(errors="replace"), e)
        return False
    return True
