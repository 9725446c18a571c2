"""A real `docker-registry` process on 127.0.0.1 for tests, demo and bench.

The registry's JSON access log is the evidence of what was downloaded: every
"response completed" line carries the request URI and the bytes written.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REGISTRY_BIN = "docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Access:
    method: str
    uri: str
    status: int
    written: int


class RegistryProcess:
    """Starts `docker-registry serve` with a config of our own; stops it by PID.

    ``extra`` is merged into the YAML config (as JSON, which YAML accepts), e.g.
    ``{"auth": {"htpasswd": {...}}}`` or ``{"proxy": {"remoteurl": ...}}``.
    """

    def __init__(self, root: Path | None = None, port: int | None = None, extra: dict | None = None):
        self._tmp = None
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="als-registry-")
            root = Path(self._tmp.name)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra or {}
        self.log_path = self.root / "registry.log"
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self, timeout: float = 20.0) -> "RegistryProcess":
        config = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.root / "data")},
                        "delete": {"enabled": True}},
            "http": {"addr": self.host},
        }
        config.update(self.extra)
        cfg = self.root / "config.yml"
        cfg.write_text(json.dumps(config))
        # docker-registry reads every REGISTRY_* variable as a config override.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=log, stderr=log,
                                     env=env, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=2):
                    return self
            except urllib.error.HTTPError:
                return self  # 401 from an auth-enabled registry: it is up
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("docker-registry did not start in time")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> "RegistryProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def accesses(self) -> list[Access]:
        """Every completed request so far, from the registry's JSON log."""
        out = []
        if not self.log_path.exists():
            return out
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("msg") != "response completed":
                continue
            out.append(Access(
                method=rec.get("http.request.method", ""),
                uri=rec.get("http.request.uri", ""),
                status=int(rec.get("http.response.status", 0)),
                written=int(rec.get("http.response.written", 0)),
            ))
        return out

    def blob_bytes_served(self, digest: str | None = None) -> int:
        """Bytes of blob bodies the registry sent (for one digest, or all)."""
        total = 0
        for a in self.accesses():
            if a.method == "GET" and "/blobs/" in a.uri and (digest is None or a.uri.endswith(digest)):
                total += a.written
        return total

    def mark(self) -> int:
        """A position in the log, once earlier requests' lines are in; for ``accesses_since``."""
        return len(self.accesses_since(0))

    def accesses_since(self, mark: int, settle: float = 0.3) -> list[Access]:
        """Requests logged since ``mark``, once the log has been quiet for ``settle`` seconds.

        docker-registry writes a request's line just after its answer, so a
        client that has its bytes may be ahead of the log. Bounded: 5 s at most.
        """
        deadline = time.monotonic() + 5.0
        seen = self.accesses()
        while settle and time.monotonic() < deadline:
            time.sleep(settle)
            now = self.accesses()
            if len(now) == len(seen):
                break
            seen = now
        return seen[mark:]
