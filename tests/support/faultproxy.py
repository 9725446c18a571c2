"""A fault-injecting TCP proxy on 127.0.0.1, in front of a real registry.

The store talks to the proxy as if it were the registry; the test switches
the proxy's mode to make the registry misbehave the ways networks do:

* ``PASS``    forward both ways
* ``REFUSE``  close connections without a word (a registry that went away)
* ``RESET``   answer with a TCP reset (RST)
* ``ERROR``   answer every request with ``500 Internal Server Error``
* ``STALL``   hold the registry's answer back (a hung registry; resumes on PASS)
* ``CUT``     pass ``cut_after`` bytes of the answer, then close (stops mid-read)
* ``TRICKLE`` pass the answer one byte every ``trickle_interval`` seconds

A mode applies to every connection, new and existing, until changed; with
``count=N`` it applies to the next N new connections only; with ``match``
(ERROR and RESET only) it applies to the requests whose head contains that
text (e.g. ``"Range: bytes"``: blob reads fail, manifests pass). Everything is
bounded: at most ``max_connections`` connections (more are closed at once),
every wait polls a stop flag, and ``stop()`` closes all sockets and joins
all threads.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.support.store_process import StoreProcess, write_registries_conf

PASS, REFUSE, RESET, ERROR, STALL, CUT, TRICKLE = "pass", "refuse", "reset", "error", "stall", "cut", "trickle"
MODES = (PASS, REFUSE, RESET, ERROR, STALL, CUT, TRICKLE)
_POLL = 0.05
_ERROR_ANSWER = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n"
                 b"Connection: close\r\n\r\nbroken")


@dataclass
class ProxyStats:
    connections: int = 0
    faults: int = 0  # connections a fault was applied to
    bytes_down: int = 0  # registry -> store bytes passed on
    rejected: int = 0  # connections over max_connections


class FaultProxy:
    def __init__(self, upstream_host: str, *, max_connections: int = 64, cut_after: int = 4096,
                 trickle_interval: float = 0.2):
        host, port = upstream_host.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.max_connections = max_connections
        self.cut_after = cut_after
        self.trickle_interval = trickle_interval
        self.stats = ProxyStats()
        self._mode = PASS
        self._count: int | None = None  # new connections the mode still applies to (None: all)
        self._match: bytes | None = None  # only requests containing this (ERROR, RESET)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(_POLL)
        self.port = self._listener.getsockname()[1]
        self._acceptor: threading.Thread | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- control ------------------------------------------------------------------------
    def set(self, mode: str, *, count: int | None = None, drop: bool = False, match: str | None = None) -> None:
        """Switch mode (for the next ``count`` new connections only, if given).

        ``drop`` closes every open connection first, so the client's pooled
        keep-alive connections cannot dodge a mode meant for new ones.
        """
        if mode not in MODES or (match and mode not in (ERROR, RESET)):
            raise ValueError(mode)
        with self._lock:
            self._mode, self._count = (PASS, None) if match else (mode, count)
            self._match = (match.encode(), mode) if match else None
            conns = list(self._conns) if drop else []
        for c in conns:
            _shutdown(c)  # wakes the connection's thread, which closes it: no fd is closed under it

    def mode(self) -> str:
        with self._lock:
            return self._mode

    def start(self) -> "FaultProxy":
        self._acceptor = threading.Thread(target=self._accept, name="faultproxy", daemon=True)
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        _close(self._listener)
        if self._acceptor is not None:
            self._acceptor.join(5)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for c in conns:
            _shutdown(c)
        for t in threads:
            t.join(5)
        alive = [t for t in threads if t.is_alive()]
        assert not alive, f"fault proxy threads still running: {alive}"

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- machinery ----------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()]
                if len(self._threads) >= self.max_connections:
                    self.stats.rejected += 1
                    _close(client)
                    continue
                self.stats.connections += 1
                fixed = None  # this connection's own mode, when the mode is counted
                if self._count is not None:
                    if self._count > 0:
                        fixed, self._count = self._mode, self._count - 1
                    else:
                        fixed = PASS
                self._conns.add(client)
                t = threading.Thread(target=self._serve, args=(client, fixed), name="faultproxy-conn",
                                     daemon=True)
                self._threads.append(t)
            t.start()

    def _current(self, fixed: str | None) -> str:
        if fixed is not None:
            return fixed
        with self._lock:
            return self._mode

    def _fault(self) -> None:
        with self._lock:
            self.stats.faults += 1

    def _serve(self, client: socket.socket, fixed: str | None) -> None:
        upstream = None
        try:
            mode = self._current(fixed)
            if mode == REFUSE:
                self._fault()
                return
            if mode in (RESET, ERROR):
                self._fault()
                _read_request(client, self._stop)
                if mode == ERROR:
                    client.sendall(_ERROR_ANSWER)
                else:
                    _reset(client)
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                return  # the registry is down: the client sees its connection closed
            with self._lock:
                self._conns.add(upstream)
            self._pump(client, upstream, fixed)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(client)
                if upstream is not None:
                    self._conns.discard(upstream)
            _close(client)
            if upstream is not None:
                _close(upstream)

    def _pump(self, client: socket.socket, upstream: socket.socket, fixed: str | None) -> None:
        client.setblocking(False)
        upstream.setblocking(False)
        pending = bytearray()
        budget = None  # bytes still allowed through in CUT mode
        faulted = False
        last_trickle = 0.0
        while not self._stop.is_set():
            mode = self._current(fixed)
            if mode != PASS and not faulted:
                faulted = True
                self._fault()
            if mode in (REFUSE, ERROR):
                return
            if mode == RESET:
                _reset(client)
                return
            if mode == CUT and budget is None:
                budget = self.cut_after
            # Only ask for the registry's answer when it may pass: a stalled one stays in its socket.
            wanted = [client] if mode == STALL or len(pending) > (1 << 20) else [client, upstream]
            readable, _, _ = select.select(wanted, [], [], _POLL)
            for sock in readable:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    if sock is upstream and pending and mode in (PASS, CUT):
                        self._send(client, pending, budget)
                    return
                if sock is client and self._matched(client, data):
                    return
                if sock is client:
                    upstream.setblocking(True)
                    upstream.settimeout(5)
                    try:
                        upstream.sendall(data)
                    finally:
                        upstream.setblocking(False)
                else:
                    pending += data
            if not pending:
                continue
            if mode == PASS:
                self._send(client, pending, None)
            elif mode == CUT:
                budget -= self._send(client, pending, budget)
                if budget <= 0:
                    return
            elif mode == TRICKLE and time.monotonic() - last_trickle >= self.trickle_interval:
                last_trickle = time.monotonic()
                self._send(client, pending, 1)

    def _matched(self, client: socket.socket, request: bytes) -> bool:
        """Answer a request the ``match`` option picks out (500 or RST); True if it was."""
        with self._lock:
            match = self._match
        if match is None or match[0] not in request:
            return False
        self._fault()
        if match[1] == ERROR:
            client.settimeout(5)
            client.sendall(_ERROR_ANSWER)
        else:
            _reset(client)
        return True

    def _send(self, client: socket.socket, pending: bytearray, limit: int | None) -> int:
        """Send up to ``limit`` pending bytes (all if None), blocking at most a few seconds."""
        piece = bytes(pending if limit is None else pending[:limit])
        client.settimeout(5)
        try:
            client.sendall(piece)
        finally:
            client.setblocking(False)
        del pending[:len(piece)]
        with self._lock:
            self.stats.bytes_down += len(piece)
        return len(piece)


def _read_request(sock: socket.socket, stop: threading.Event, limit: int = 64 << 10) -> None:
    """Read until the end of an HTTP request head (bounded in size and time)."""
    sock.settimeout(_POLL)
    buf = b""
    deadline = time.monotonic() + 5
    while b"\r\n\r\n" not in buf and len(buf) < limit and time.monotonic() < deadline and not stop.is_set():
        try:
            part = sock.recv(65536)
        except socket.timeout:
            continue
        if not part:
            return
        buf += part



@contextlib.contextmanager
def store_behind(proxy: "FaultProxy", registry, work: Path, config: str) -> Iterator[StoreProcess]:
    """`als serve` reaching ``registry`` both directly and through ``proxy`` (by the proxy's host)."""
    conf = write_registries_conf(work / "registries.conf", [registry.host, proxy.host])
    with StoreProcess(work, registries_conf=conf, config=config) as s:
        yield s


@contextlib.contextmanager
def healthy_around(proxy: "FaultProxy", registry) -> Iterator["FaultProxy"]:
    """A passing proxy for the test, and a working registry behind it afterwards, whatever the test broke."""
    proxy.set(PASS)
    try:
        yield proxy
    finally:
        proxy.set(PASS, drop=True)
        if registry.proc is None:
            registry.start()


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
