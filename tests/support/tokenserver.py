"""A Docker token service on 127.0.0.1 for tests (docker-registry ``auth: token``).

It issues ES256 JWTs signed with a key generated per instance and carries the
self-signed certificate of that key in the JWT header (``x5c``), which
docker-registry accepts when the same certificate is its ``rootcertbundle``.
Authenticated users get the pull/push actions they ask for; anonymous callers
get only ``anonymous_actions`` (none by default), so they hold a token that
the registry refuses. Every request is recorded, to show token caching.
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class TokenRequest:
    method: str
    user: str | None  # None: anonymous
    scopes: list[str]
    granted: list[dict]


@dataclass
class TokenServer:
    users: dict[str, str] = field(default_factory=dict)  # user -> password
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # token -> user
    anonymous_actions: tuple[str, ...] = ()
    service: str = "als-test-registry"
    issuer: str = "als-test-issuer"
    ttl: int = 300
    requests: list[TokenRequest] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)  # every token handed out

    def __post_init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="als-tokenserver-")
        self.cert_path = Path(self._tmp.name) / "root.pem"
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.rotate_key()

    def rotate_key(self) -> None:
        """A new signing key and certificate (rewritten at ``cert_path``).

        A registry restarted after this refuses every token issued before:
        the way to make a real registry answer 401 to a token we still cache.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .sign(key, hashes.SHA256()))
        with self._lock:
            self._key, self._cert = key, cert
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "TokenServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                owner._handle(self, parse_qs(urlsplit(self.path).query))

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode("utf-8"))
                owner._handle(self, form)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def cleanup(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> "TokenServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    @property
    def realm(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def registry_auth(self) -> dict:
        """The ``auth`` section for RegistryProcess(extra={"auth": ...})."""
        return {"token": {"realm": self.realm, "service": self.service, "issuer": self.issuer,
                          "rootcertbundle": str(self.cert_path)}}

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    # -- the token endpoint -----------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, params: dict[str, list[str]]) -> None:
        user: str | None = None
        if h.command == "POST":
            if params.get("grant_type") != ["refresh_token"]:
                return self._reply(h, 400, {"error": "unsupported_grant_type"})
            user = self.refresh_tokens.get((params.get("refresh_token") or [""])[0])
            if user is None:
                return self._reply(h, 401, {"error": "invalid_grant"})
        else:
            auth = h.headers.get("Authorization", "")
            if auth:
                try:
                    scheme, value = auth.split(" ", 1)
                    name, _, password = base64.b64decode(value).decode().partition(":")
                except ValueError:
                    return self._reply(h, 401, {"error": "bad header"})
                if scheme.lower() != "basic" or self.users.get(name) != password:
                    with self._lock:
                        self.requests.append(TokenRequest("GET", name, [], []))
                    return self._reply(h, 401, {"error": "invalid credentials"})
                user = name
        if (params.get("service") or [""])[0] != self.service:
            return self._reply(h, 400, {"error": "unknown service"})
        scopes = [s for v in params.get("scope", []) for s in v.split(" ") if s]
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            allowed = {"pull", "push"} if user is not None else set(self.anonymous_actions)
            access.append({"type": kind, "name": name,
                           "actions": [a for a in wanted if a in allowed]})
        token = self._jwt(user or "", access)
        with self._lock:
            self.requests.append(TokenRequest(h.command, user, scopes, access))
            self.issued.append(token)
        key = "access_token" if h.command == "POST" else "token"
        self._reply(h, 200, {key: token, "expires_in": self.ttl,
                             "issued_at": datetime.datetime.now(datetime.timezone.utc).isoformat()})

    def _jwt(self, subject: str, access: list[dict]) -> str:
        with self._lock:
            key, cert = self._key, self._cert
        der = cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode("ascii")]}
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + self.ttl,
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "."
                         + _b64url(json.dumps(claims).encode()))
        r, s = decode_dss_signature(key.sign(signing_input.encode("ascii"),
                                             ec.ECDSA(hashes.SHA256())))
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
