"""An insecure registry's first exchange: HTTPS and plain HTTP are tried at once, not one after the other.

Over a real docker-registry (plain HTTP) behind a gate that holds every TLS
connection until a plain HTTP one has arrived (or 1 s has passed): a client
that probed HTTPS first and only then spoke plain HTTP would find nothing
plain while its TLS attempt is held.
"""

from __future__ import annotations

import socket
import threading


from als.reference import parse_reference
from tests.support.regtest import fast_client, hermetic_env, insecure, push_image, sha, write_conf  # noqa: F401

HOLD = 1.0  # seconds a TLS connection waits for a plain one before it is dropped (below the client's timeouts)


class TLSGate:
    """A TCP front for a plain HTTP server: TLS connections are held, then dropped; plain ones pass."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.plain_seen = threading.Event()
        self.tls_held = 0
        self.plain_while_tls_held = False  # a plain connection arrived while a TLS one was held
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._closing = False
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> "TLSGate":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing = True
        self._listener.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._socks.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(HOLD)
        try:
            first = conn.recv(1, socket.MSG_PEEK)
        except OSError:
            return
        if first == b"\x16":  # a TLS handshake record: hold it, then drop it
            with self._lock:
                self.tls_held += 1
            seen = self.plain_seen.wait(HOLD)
            with self._lock:
                self.plain_while_tls_held |= seen
            conn.close()
            return
        self.plain_seen.set()
        conn.settimeout(None)
        upstream = socket.create_connection(self.upstream, timeout=10)
        with self._lock:
            self._socks.append(upstream)
        threading.Thread(target=_pump, args=(upstream, conn), daemon=True).start()
        _pump(conn, upstream)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def test_first_request_to_an_insecure_plain_registry_does_not_wait_for_https(registry, tmp_path):
    with fast_client(write_conf(tmp_path, insecure(registry.host))) as c:
        image = push_image(c, parse_reference(f"{registry.host}/ns/app:v1"))
    with TLSGate(("127.0.0.1", registry.port)) as gate:
        (tmp_path / "gate").mkdir()
        with fast_client(write_conf(tmp_path / "gate", insecure(gate.host))) as c:
            m = c.get_manifest(parse_reference(f"{gate.host}/ns/app:v1"))
            assert m.digest == image.digest
            assert c.http.schemes == {gate.host: "http"}
            # Remembered: the next request neither probes HTTPS nor races.
            blob = c.get_blob(parse_reference(f"{gate.host}/ns/app:v1"), sha(image.config), 1 << 20)
            assert blob == image.config
        assert gate.tls_held == 1
        assert gate.plain_while_tls_held, "plain HTTP was only tried after the HTTPS attempt failed"

