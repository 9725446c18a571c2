"""An "object storage" on 127.0.0.1 for docker-registry's ``redirect`` storage middleware.

With ``middleware: storage: [{name: redirect, options: {baseurl: URL}}]``
docker-registry (2.8) answers blob GETs with a 307 to ``URL``'s scheme and
host with the blob's path in the filesystem driver. This serves those files
(with Range) from the registry's storage root, like a bucket behind signed
URLs: each generation listens on a port of its own, and after ``rotate()``
the older ports answer ``refusal`` (403 by default, as S3 answers an expired
signature) to everything. Restart the registry with the new ``baseurl()``
and it hands out URLs that work again. Every request is recorded.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class StorageRequest:
    method: str
    path: str
    generation: int
    range: str
    status: int


class ObjectStore:
    def __init__(self, data_root: Path, refusal: int = 403):
        self.data_root = Path(data_root)
        self.refusal = refusal
        self.requests: list[StorageRequest] = []
        self._lock = threading.Lock()
        self._servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    @property
    def generation(self) -> int:
        with self._lock:
            return len(self._servers)

    def baseurl(self) -> str:
        """The redirect middleware's baseurl for the current generation."""
        with self._lock:
            return f"http://127.0.0.1:{self._servers[-1][0].server_address[1]}/"

    def start(self) -> "ObjectStore":
        self.rotate()
        return self

    def rotate(self) -> None:
        """A new generation on a new port; URLs of older generations are refused from now on."""
        store = self

        with self._lock:
            generation = len(self._servers) + 1

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 15

            def do_GET(self):  # noqa: N802
                store._serve(self, generation)

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        with self._lock:
            self._servers.append((server, thread))

    def stop(self) -> None:
        with self._lock:
            servers, self._servers = self._servers, []
        for server, thread in servers:
            server.shutdown()
            server.server_close()
            thread.join(5)

    def __enter__(self) -> "ObjectStore":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def seen(self, status: int | None = None) -> list[StorageRequest]:
        with self._lock:
            return [r for r in self.requests if status is None or r.status == status]

    def _serve(self, h: BaseHTTPRequestHandler, generation: int) -> None:
        url_path = h.path.split("?", 1)[0]
        rng = h.headers.get("Range", "")
        valid = generation == self.generation
        path = (self.data_root / url_path.lstrip("/")).resolve()
        if not valid:
            status, body, headers = self.refusal, b"<Error><Code>AccessDenied</Code>" \
                b"<Message>Request has expired</Message></Error>", {}
        elif not path.is_relative_to(self.data_root.resolve()) or not path.is_file():
            status, body, headers = 404, b"", {}
        else:
            data = path.read_bytes()
            m = _RANGE.fullmatch(rng.strip()) if rng else None
            if m:
                start = int(m.group(1))
                end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
                status, body = 206, data[start:end + 1]
                headers = {"Content-Range": f"bytes {start}-{end}/{len(data)}"}
            else:
                status, body, headers = 200, data, {}
        with self._lock:
            self.requests.append(StorageRequest(h.command, url_path, generation, rng, status))
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)
