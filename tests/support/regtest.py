"""Helpers shared by the registry tests: real registries, hermetic credentials, test images.

Tests that use them import ``hermetic_env`` into their module, where it acts
as an autouse fixture: no test may see the host's credentials,
registries.conf or proxies.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import random
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from als.reference import Reference
from als.oci import OCI_MANIFEST
from als.registry.client import RegistryClient
from als.registry.sysregistries import RegistriesConf
from tests.support.registry import RegistryProcess

PASSWORD = "s3cr3t-Pa55w0rd!"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch, tmp_path):
    """No test may see the host's credentials or registries.conf."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("CONTAINERS_REGISTRIES_CONF", raising=False)
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                  "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)  # every request stays on 127.0.0.1
    return tmp_path


def wait_accesses(reg: RegistryProcess, mark: int, pred, n: int = 1, timeout: float = 5.0):
    """The registry's log entries since ``mark`` that satisfy ``pred``, once there are ``n``.

    docker-registry writes a request's log line just after the response, so
    it may trail what the client already has.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = [a for a in reg.accesses_since(mark) if pred(a)]
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def write_conf(dir_: Path, text: str) -> RegistriesConf:
    path = dir_ / "registries.conf"
    path.write_text(text)
    return RegistriesConf.load(str(path))


def insecure(*hosts: str) -> str:
    return "".join(f'[[registry]]\nlocation = "{h}"\ninsecure = true\n\n' for h in hosts)


def mirrored(origin: str, mirror: str, pull_from_mirror: str = "") -> str:
    """registries.conf text: plain-HTTP ``origin`` with one plain-HTTP ``[[registry.mirror]]``."""
    extra = f'pull-from-mirror = "{pull_from_mirror}"\n' if pull_from_mirror else ""
    return (f'[[registry]]\nlocation = "{origin}"\ninsecure = true\n'
            f'[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n{extra}\n')


def auth_file(path: Path, entries: dict[str, dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": entries}))
    return path


def b64auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Image:
    ref: Reference
    config: bytes
    layer: bytes
    manifest: bytes
    digest: str


def make_image(seed: int = 1, size: int = 300_000) -> tuple[bytes, bytes, bytes]:
    rnd = random.Random(seed)
    layer = rnd.randbytes(size)
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha(layer), "size": len(layer)}],
    }).encode()
    return config, layer, manifest


def push_image(client: RegistryClient, ref: Reference, seed: int = 1) -> Image:
    config, layer, manifest = make_image(seed)
    client.push_blob(ref, config, sha(config), len(config))
    client.push_blob(ref, io.BytesIO(layer), sha(layer), len(layer))
    digest = client.put_manifest(ref, manifest, OCI_MANIFEST)
    return Image(ref, config, layer, manifest, digest)


def fast_client(conf: RegistriesConf, **kw) -> RegistryClient:
    kw.setdefault("retries", 1)
    kw.setdefault("backoff", 0.01)
    kw.setdefault("connect_timeout", 2.0)
    kw.setdefault("read_timeout", 5.0)
    client = RegistryClient(conf, **kw)
    client.session.trust_env = False  # no proxy or .netrc from the environment: 127.0.0.1 only
    return client


@contextlib.contextmanager
def http_server(handler_cls):
    """A throwaway HTTP server on 127.0.0.1, stopped on exit."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def log_lines(reg: RegistryProcess) -> int:
    """How many lines the registry's log has: a mark for :func:`auth_refusals`."""
    return len(reg.log_path.read_text(errors="replace").splitlines()) if reg.log_path.exists() else 0


def auth_refusals(reg: RegistryProcess, since: int = 0, timeout: float = 0.5) -> list[str]:
    """URIs the registry answered 401 since log line ``since``.

    docker-registry logs an authorization failure as an "error authorizing
    context" warning, not as a completed response; this waits ``timeout``
    for late log lines first.
    """
    time.sleep(timeout)
    out = []
    for line in reg.log_path.read_text(errors="replace").splitlines()[since:]:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if str(rec.get("msg", "")).startswith("error authorizing context"):
            out.append(rec.get("http.request.uri", ""))
    return out


def requests_seen(reg: RegistryProcess, since: int = 0, timeout: float = 5.0,
                  n: int = 1) -> list[tuple[str, str]]:
    """(method, URI) of every request the registry logged anything about since log line ``since``.

    Unlike the access log ("response completed"), this includes requests the
    client broke off, e.g. a range read of a pull-through cache that answered
    with the whole blob. Waits up to ``timeout`` for ``n`` of them.
    """
    deadline = time.monotonic() + timeout
    while True:
        seen: dict[str, tuple[str, str]] = {}
        for line in reg.log_path.read_text(errors="replace").splitlines()[since:]:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            rid = rec.get("http.request.id")
            if rid and rid not in seen:
                seen[rid] = (rec.get("http.request.method", ""), rec.get("http.request.uri", ""))
        if len(seen) >= n or time.monotonic() > deadline:
            return list(seen.values())
        time.sleep(0.05)


def settled_lines(reg: RegistryProcess, quiet: float = 0.3, timeout: float = 5.0) -> int:
    """:func:`log_lines` once the log has not grown for ``quiet`` seconds (late lines of
    earlier requests land before the mark, not after it)."""
    deadline = time.monotonic() + timeout
    last = log_lines(reg)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = log_lines(reg)
        if now == last:
            break
        last = now
    return last


@contextlib.contextmanager
def running_token_registry(users: dict[str, str]):
    """docker-registry in token-auth mode in front of our token service; stopped on exit."""
    from tests.support.tokenserver import TokenServer

    ts = TokenServer(users=dict(users), refresh_tokens={"refresh-" + PASSWORD: "bob"})
    reg = None
    try:
        ts.start()
        reg = RegistryProcess(extra={"auth": ts.registry_auth()}).start()
        yield reg, ts
    finally:
        if reg is not None:
            reg.cleanup()
        ts.cleanup()


QUIET = "[fetch]\nbackground = false\n"


USERS = {"alice": PASSWORD + "-alice", "bob": PASSWORD + "-bob"}


def store_config(**registry: str) -> str:
    lines = [QUIET, "[registry]", 'kubelet_config = ""']
    lines += [f"{k} = {json.dumps(v)}" for k, v in registry.items() if k != "kubelet_config"]
    if "kubelet_config" in registry:
        lines[2] = f"kubelet_config = {json.dumps(registry['kubelet_config'])}"
    return "\n".join(lines) + "\n"


def htpasswd_registry(tmp_path, **extra) -> RegistryProcess:
    lines = [subprocess.run(["htpasswd", "-Bbn", user, pw], check=True, capture_output=True,
                            text=True).stdout.strip() for user, pw in USERS.items()]
    (tmp_path / "htpasswd").write_text("\n".join(lines) + "\n")
    return RegistryProcess(extra={"auth": {"htpasswd": {"realm": "r", "path": str(tmp_path / "htpasswd")}},
                                  **extra})
