"""Keeping each mount's FUSE connection outside `als serve`, and taking it back on the next start.

A running container reads its layers through the store's FUSE connection;
the kernel ends that connection when its last /dev/fuse descriptor closes. So
once mounted, the store gives a copy of each descriptor to a keeper that
outlives it: systemd's file descriptor store when it runs under systemd
(``FDSTORE=1``, given back in ``$LISTEN_FDS``), otherwise a holder process
(als/ops/holder.py). Meanwhile ``<root>/fuse-connections.json`` records, per
mount, what a successor needs and cannot ask the kernel for: what INIT
negotiated, and which mount (device number) the descriptor serves.

Only connections whose kernel can re-send unanswered requests
(FUSE_NOTIFY_RESEND, Linux 6.9) are kept: elsewhere a kept descriptor would
turn a dead mount's quick failures into hangs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from als.files import atomic_write
from als.ops import holder, notify

log = logging.getLogger("als")

RECORD = "fuse-connections.json"


def mount_dev(mountpoint: Path) -> str | None:
    """``major:minor`` of the topmost mount on ``mountpoint`` (an absolute path, links resolved),
    read from mountinfo: a stat could wait for ever on a connection nobody serves."""
    target, dev = str(mountpoint), None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                dev = fields[2]
    return dev


@dataclass
class Kept:
    """Descriptors found at start, by mount name, and who kept them."""

    source: str = ""  # "systemd", "holder", or "" (none)
    fds: dict[str, int] = field(default_factory=dict)
    holder_pid: int = 0
    attached: bool = False  # a store is serving them now (the holder knows)


def _holder_request(root: Path, message: dict, fds: list[int] = (), keep_open: bool = False):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(5)
    try:
        sock.connect(str(root / holder.SOCKET_NAME))
        holder.send(sock, message, fds)
        reply, got = holder.receive(sock)
    except OSError:
        sock.close()
        raise
    if keep_open:
        return reply, got, sock
    sock.close()
    return reply, got


def take(root: Path, names: list[str]) -> Kept:
    """The descriptors a keeper holds for mounts ``names`` (systemd's first, then a holder's)."""
    passed = notify.listen_fds()
    fds = {}
    for name, got in passed.items():
        for fd in got:
            if name in names and name not in fds:
                fds[name] = fd
            else:
                os.close(fd)
    if fds:
        return Kept("systemd", fds)
    if not (root / holder.SOCKET_NAME).exists():
        return Kept()
    try:
        reply, got = _holder_request(root, {"op": "get"})
    except OSError as e:
        log.warning("the connection holder at %s does not answer (%s)", root / holder.SOCKET_NAME, e)
        return Kept()
    return Kept("holder", dict(zip(reply.get("names", []), got)), int(reply.get("pid", 0)),
                bool(reply.get("attached")))


def read_record(root: Path) -> dict[str, dict]:
    """What was recorded of each kept connection, by mount name."""
    try:
        data = json.loads((root / RECORD).read_text())
        return {m["name"]: m for m in data["mounts"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_record(root: Path, mounts: list[dict]) -> None:
    atomic_write(root / RECORD, json.dumps({"mounts": mounts}, indent=1).encode(), root)


class Keeper:
    """Keeps the connections of this store for the next one, and lets go of those not taken over."""

    def __init__(self, root: Path, grace: float):
        self.root, self.grace = root, grace
        self.source = ""  # who keeps this store's connections: "systemd", "holder" or ""
        self.holder_pid = 0
        self._attached: socket.socket | None = None

    def describe(self) -> str:
        return {"systemd": "systemd's file descriptor store",
                "holder": f"the connection holder (pid {self.holder_pid})"}.get(self.source, "nobody")

    def discard(self, kept: Kept) -> None:
        """Let go of connections that are not taken over: every copy must close for them to end."""
        for fd in kept.fds.values():
            os.close(fd)
        if kept.source == "systemd":
            for name in kept.fds:
                notify.remove_fds(name)
        elif kept.source == "holder":
            try:
                _holder_request(self.root, {"op": "drop"})
            except OSError:
                pass
        try:
            (self.root / RECORD).unlink()
        except FileNotFoundError:
            pass

    def resumed(self, kept: Kept) -> None:
        """The connections ``kept`` are served again: their keeper keeps them for the next store too."""
        self.source, self.holder_pid = kept.source, kept.holder_pid
        if kept.source == "holder":
            self._attach()

    def keep(self, mounts: list[dict], fds: list[int]) -> None:
        """Hand copies of freshly mounted connections to a keeper; ``mounts`` is their record."""
        write_record(self.root, mounts)
        names = [m["name"] for m in mounts]
        if all(notify.store_fds(name, [fd]) for name, fd in zip(names, fds)):
            self.source = "systemd"
            return
        try:
            self._start_holder()
            reply, _ = _holder_request(self.root, {"op": "put", "names": names,
                                                   "mountpoints": [m["mountpoint"] for m in mounts]}, fds)
            self.holder_pid = int(reply.get("pid", 0))
            self.source = "holder"
        except OSError as e:
            log.warning("cannot keep the FUSE connections outside the store (%s): a restart will mount afresh", e)

    def _start_holder(self) -> None:
        path = self.root / holder.SOCKET_NAME
        subprocess.Popen([sys.executable, "-m", "als.ops.holder", str(path), str(self.grace)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
                         close_fds=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self._attach()
                return
            except OSError:
                time.sleep(0.05)
        self._attach()

    def _attach(self) -> None:
        """Stay connected to the holder while serving: it waits for a successor only once we are gone."""
        reply, _, sock = _holder_request(self.root, {"op": "attach"}, keep_open=True)
        sock.settimeout(None)
        self._attached = sock
        self.holder_pid = int(reply.get("pid", self.holder_pid))
