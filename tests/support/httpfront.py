"""A small HTTP/1.1 reverse proxy on 127.0.0.1 in front of a real registry, for tests.

It forwards every request to the registry unless a ``hook`` answers it
itself (a 503, a redirect, a stall), can add headers to the registry's
answers (``extra_headers``, which sees the request body and the status), can
drop ``Range`` to play a registry that ignores it, and records what happened: TCP connections accepted,
requests, and body bytes actually written to the client (so a client that
stops reading early shows up as fewer bytes).
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}
_CHUNK = 16 * 1024


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    written: int = 0  # body bytes sent to the client
    body: bytes = b""  # the request body
    at: float = field(default_factory=time.monotonic)


Answer = tuple[int, dict[str, str], bytes]
Hook = Callable[[Seen], Optional[Answer]]
ExtraHeaders = Callable[[Seen], dict[str, str]]


class Front:
    """``Front(registry.host, hook=..., extra_headers=..., strip_range=...)``; ``with`` starts and stops it."""

    def __init__(self, upstream: str, *, hook: Hook | None = None, extra_headers: ExtraHeaders | None = None,
                 strip_range: bool = False):
        self.upstream = upstream
        self.hook = hook
        self.extra_headers = extra_headers
        self.strip_range = strip_range
        self.connections = 0
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._open: set[socket.socket] = set()

    @property
    def host(self) -> str:
        assert self._server is not None, "start() first"
        return f"127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "Front":
        front = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request, client_address):
                with front._lock:
                    front.connections += 1
                    front._open.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request):
                with front._lock:
                    front._open.discard(request)
                super().shutdown_request(request)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 15  # an idle keep-alive connection ends after this

            def do_GET(self):  # noqa: N802
                front._serve(self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET  # noqa: N815

            def log_message(self, *args):
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self._lock:
                for s in list(self._open):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> "Front":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def seen(self, pred: Callable[[Seen], bool] = lambda s: True) -> list[Seen]:
        with self._lock:
            return [s for s in self.requests if pred(s)]

    # -- one request -------------------------------------------------------------
    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        seen = Seen(h.command, h.path, {k: v for k, v in h.headers.items()})
        with self._lock:
            self.requests.append(seen)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        seen.body = body
        answer = self.hook(seen) if self.hook else None
        if answer is not None:
            status, headers, data = answer
            seen.status = status
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
                seen.written = len(data)
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        if self.strip_range:
            headers = {k: v for k, v in headers.items() if k.lower() != "range"}
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            conn.request(h.command, h.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            seen.status = resp.status
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
            if self.extra_headers:
                out += list(self.extra_headers(seen).items())
            has_length = any(k.lower() == "content-length" for k, _ in out)
            data = b"" if has_length or h.command == "HEAD" else resp.read()
            h.send_response(resp.status)
            for k, v in out:
                h.send_header(k, v)
            if not has_length:
                h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command == "HEAD":
                return
            if not has_length:
                h.wfile.write(data)
                seen.written = len(data)
                return
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                try:
                    h.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    h.close_connection = True
                    return
                seen.written += len(chunk)
        finally:
            conn.close()
