"""The connection holder: a tiny process that keeps the store's /dev/fuse descriptors across its restarts.

The kernel ends a FUSE connection when its last descriptor closes, and with
it every running container's view of its layers. Under systemd the store
hands its descriptors to the service manager (``FDSTORE=1``); without it,
`als serve` starts this process, which does nothing but keep copies of them
and give copies to the next `als serve` over the unix socket
``<root>/fuse-holder.sock`` (mode 0600, peers of another uid refused).

It never reads or writes the connections. It ends by itself, so that a store
that stopped for good leaves no hang behind:

* when every connection it holds has ended (the mounts were unmounted);
* when no store has been attached to it for ``grace`` seconds (the store
  stopped and nothing took over): it then lazily unmounts the mounts and
  closes the descriptors, so blocked readers fail (ENOTCONN) rather than wait.

A store attaches by keeping a connection to the socket open while it serves.
Messages are one JSON line each, descriptors passed with SCM_RIGHTS.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import struct
import sys
import time

log = logging.getLogger("als.holder")

SOCKET_NAME = "fuse-holder.sock"
MAX_FDS = 8
MAX_MESSAGE = 64 << 10


def send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    data = json.dumps(message).encode() + b"\n"
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def receive(sock: socket.socket) -> tuple[dict, list[int]]:
    """One message and the descriptors that came with it; ({}, []) at end of stream."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    for fd in fds:
        os.set_inheritable(fd, False)
    if not data:
        return {}, fds
    try:
        message = json.loads(data)
    except ValueError:
        message = {}
    return (message if isinstance(message, dict) else {}), fds


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class Holder:
    def __init__(self, path: str, grace: float):
        self.path, self.grace = path, grace
        self.fds: list[int] = []
        self.names: list[str] = []
        self.mountpoints: list[str] = []
        self.attached: dict[int, socket.socket] = {}
        self.detached_since = time.monotonic()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self.listener.bind(path)
        finally:
            os.umask(old)
        self.listener.listen(8)
        self.inode = os.stat(path).st_ino
        self.done = False

    def _drop(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds, self.names, self.mountpoints = [], [], []

    def _handle(self, conn: socket.socket) -> bool:
        """One request; True if ``conn`` stays open (an attached store)."""
        conn.settimeout(5)
        if _peer_uid(conn) != os.geteuid():
            return False
        message, fds = receive(conn)
        op = message.get("op")
        if op == "put":
            self._drop()
            self.fds, self.names = fds, [str(n) for n in message.get("names", [])][:len(fds)]
            self.mountpoints = [str(m) for m in message.get("mountpoints", [])]
            send(conn, {"ok": True, "pid": os.getpid()})
            return False
        for fd in fds:
            os.close(fd)
        if op == "get":
            send(conn, {"names": self.names, "pid": os.getpid(), "attached": bool(self.attached)}, self.fds)
        elif op == "drop":  # the store mounted afresh: these connections are over, and so is this holder
            self._drop()
            send(conn, {"ok": True})
            self.done = True
        elif op == "attach":
            send(conn, {"ok": True, "pid": os.getpid()})
            return True
        return False

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        while True:
            watched = set(self.fds)
            for fd in watched:
                poller.register(fd, 0)  # only POLLERR: the connection has ended
            events = dict(poller.poll(1000))
            for fd in watched:
                poller.unregister(fd)
            ended = [fd for fd in self.fds if events.get(fd, 0) & (select.POLLERR | select.POLLHUP)]
            if self.fds and len(ended) == len(self.fds):
                return  # every mount is gone: nothing left to keep
            for fd, conn in list(self.attached.items()):
                if events.get(fd):
                    poller.unregister(fd)
                    del self.attached[fd]
                    conn.close()
                    if not self.attached:
                        self.detached_since = time.monotonic()
            if events.get(self.listener.fileno()):
                conn, _ = self.listener.accept()
                try:
                    keep = self._handle(conn)
                except OSError:
                    keep = False
                if keep:
                    self.attached[conn.fileno()] = conn
                    poller.register(conn, select.POLLIN)
                else:
                    conn.close()
            if self.done:
                return
            if not self.attached and time.monotonic() - self.detached_since > self.grace:
                self._give_up()
                return

    def _give_up(self) -> None:
        """No store came back: end the connections so that nothing waits on them for ever.

        The descriptors are closed first: with the last one the kernel aborts
        the connection, so waiting readers fail at once (ENOTCONN) and the
        unmount's path walk gets an answer instead of asking a server that is
        gone. Only the outermost mounts are detached: a lazy unmount takes the
        mounts below with it, and walking into them would need the dead server.
        """
        mountpoints = self.mountpoints
        self._drop()
        if not mountpoints:
            return
        print(f"{time.strftime('%F %T')} als connection holder: no store took over within {self.grace:g}s; unmounting "
              f"{', '.join(mountpoints)}", file=sys.stderr, flush=True)
        from als.fuse.mount import unmount
        for mountpoint in mountpoints:
            if not any(mountpoint.startswith(other.rstrip("/") + "/") for other in mountpoints):
                unmount(mountpoint)

    def close(self) -> None:
        try:
            if os.stat(self.path).st_ino == self.inode:  # not a newer holder's socket
                os.unlink(self.path)
        except OSError:
            pass
        self.listener.close()


def main(argv: list[str]) -> int:
    path, grace = argv[0], float(argv[1])
    holder = Holder(path, grace)
    try:
        holder.run()
    finally:
        holder.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
