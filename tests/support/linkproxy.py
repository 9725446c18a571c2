"""A WAN link emulator: a TCP proxy on 127.0.0.1 adding latency and a bandwidth cap.

This kernel has no netem qdisc, so `make bench` puts this between Podman (and
the store) and the registry. Each direction of the link is one shared
transmitter: bytes queue for it at ``bandwidth`` bits per second, then take
``rtt / 2`` to arrive; a new connection costs one round trip before its first
byte. Reading and writing are separate threads per direction, so the link
stays full while data is in flight, as a real pipe does.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from dataclasses import dataclass


@dataclass
class LinkStats:
    bytes_down: int = 0  # registry -> client
    bytes_up: int = 0
    connections: int = 0


class _Transmitter:
    """One direction of the link: serialises bytes at the link rate."""

    def __init__(self, bits_per_second: float):
        self.rate = bits_per_second / 8.0
        self._free_at = 0.0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> float:
        """When the last of ``nbytes`` queued now has left the sender."""
        with self._lock:
            start = max(self._free_at, time.monotonic())
            self._free_at = start + nbytes / self.rate
            return self._free_at


class LinkProxy:
    def __init__(self, target: tuple[str, int], *, rtt: float = 0.020, bandwidth: float = 200e6,
                 port: int = 0):
        self.target = target
        self.rtt = rtt
        self.down = _Transmitter(bandwidth)
        self.up = _Transmitter(bandwidth)
        self.stats = LinkStats()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self._closing = threading.Event()
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="linkproxy")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "LinkProxy":
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        with self._lock:
            for s in list(self._socks):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._socks.clear()
        self._thread.join(5)

    def __enter__(self) -> "LinkProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        time.sleep(self.rtt)  # the handshake's round trip
        try:
            server = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        with self._lock:
            self._socks.update((client, server))
            self.stats.connections += 1
        for src, dst, link, down in ((client, server, self.up, False), (server, client, self.down, True)):
            q: queue.Queue = queue.Queue()
            threading.Thread(target=self._read, args=(src, q, link, down), daemon=True).start()
            threading.Thread(target=self._write, args=(dst, q), daemon=True).start()

    def _read(self, src: socket.socket, q: queue.Queue, link: _Transmitter, down: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                q.put((time.monotonic() + self.rtt / 2, b""))
                return
            with self._lock:
                if down:
                    self.stats.bytes_down += len(data)
                else:
                    self.stats.bytes_up += len(data)
            q.put((link.reserve(len(data)) + self.rtt / 2, data))

    def _write(self, dst: socket.socket, q: queue.Queue) -> None:
        while True:
            deliver_at, data = q.get()
            delay = deliver_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                dst.sendall(data)
            except OSError:
                return
