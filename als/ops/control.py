"""The daemon's control socket: `als status`, `als auth-helper` and friends talk to it.

A unix socket under ``--root`` (mode 0600 in a 0700 directory), one JSON
request per connection and one JSON answer. Only the daemon's own user (root
for a system store) may connect; the peer's uid is checked with SO_PEERCRED on
top of the file permissions, because credentials pass through here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any, Callable

from als.errors import ALSError

log = logging.getLogger("als.control")

SOCKET_NAME = "als.sock"
MAX_REQUEST = 1 << 20

Handler = Callable[[dict], Any]


class ControlError(ALSError):
    """The daemon could not be reached, or it refused the request."""


def socket_path(root: Path) -> Path:
    return Path(root) / SOCKET_NAME


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]):
        self.path = Path(path)
        self.handlers = dict(handlers)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "ControlServer":
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="als-control", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.path.unlink(missing_ok=True)

    def _serve(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
                if uid not in (0, os.getuid()):
                    raise ControlError(f"uid {uid} may not use the control socket")
                req = json.loads(_read_line(conn))
                op = req.get("op")
                handler = self.handlers.get(op)
                if handler is None:
                    raise ControlError(f"unknown operation {op!r}")
                answer = {"ok": True, "result": handler(req)}
            except Exception as e:  # the answer says what went wrong; the daemon goes on
                log.warning("control request refused: %s", e)
                answer = {"ok": False, "error": str(e)}
            try:
                conn.sendall(json.dumps(answer).encode() + b"\n")
            except OSError:
                pass


def _read_line(conn: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        part = conn.recv(65536)
        if not part:
            break
        buf += part
        if len(buf) > MAX_REQUEST:
            raise ControlError("request too large")
    return buf


def request(root: Path, op: str, timeout: float = 10.0, **args) -> Any:
    """Send one request to the daemon whose ``--root`` is ``root``; return its result."""
    path = socket_path(root)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            answer = json.loads(_read_line(s) or b"{}")
    except (OSError, ValueError) as e:
        raise ControlError(f"cannot reach the store at {path}: {e}") from None
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "no answer"))
    return answer.get("result")
