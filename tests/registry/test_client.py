"""registries.conf, auth files and the registry client, against real docker-registry processes.

Live tests run docker-registry on 127.0.0.1 (tests/support/registry.py) and,
for bearer tokens, a token service in a thread (tests/support/tokenserver.py).
A few corner cases (tampered manifests, exact retry counts) are also tested
with a fake transport mounted on the client's requests session; each
behaviour has a real-registry test as well, here or in
test_registry_{auth,tls,transport,mirrors,e2e}.py.
"""

from __future__ import annotations

import io
import json
import logging
import random
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import requests
import urllib3
from requests.adapters import BaseAdapter, HTTPAdapter

from als.errors import (AuthError, BlockedError, ConfigError, NotFoundError, RegistryError,
                        VerificationError)
from als.reference import parse_reference
from als.registry.challenges import parse_challenges
from als.registry.credentials.authfiles import AuthFile, default_auth_files, find_credentials
from als.registry.credentials.entries import Credentials
from als.oci import OCI_MANIFEST
from als.registry.client import RegistryClient
from als.registry.pull import Manifest
from als.registry.sysregistries import Endpoint, RegistriesConf
from tests.support.registry import RegistryProcess, free_port
from tests.support.regtest import (mirrored, PASSWORD, running_token_registry, auth_file, b64auth, fast_client, hermetic_env,  # noqa: F401
                                   http_server, insecure, push_image, sha, wait_accesses,
                                   write_conf)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """One registry with one image, shared by the read-only tests."""
    reg = RegistryProcess().start()
    try:
        conf_dir = tmp_path_factory.mktemp("conf")
        (conf_dir / "registries.conf").write_text(insecure(reg.host))
        conf = RegistriesConf.load(str(conf_dir / "registries.conf"))
        with fast_client(conf) as client:
            image = push_image(client, parse_reference(f"{reg.host}/ns/app:v1"))
        yield reg, conf, image
    finally:
        reg.cleanup()


@pytest.fixture
def client(plain):
    _, conf, _ = plain
    with fast_client(conf) as c:
        yield c


class FakeTransport(BaseAdapter):
    """A requests adapter answering from a function: (status, headers, body) per request."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer
        self.requests: list[requests.PreparedRequest] = []
        self.bytes_read = 0

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        self.requests.append(request)
        status, headers, body = self.answer(request)
        owner = self

        class Counting(io.BytesIO):
            def read(self, n=-1):
                data = super().read(n)
                owner.bytes_read += len(data)
                return data

            def read1(self, n=-1):
                return self.read(n)

            def readinto(self, b):
                data = self.read(len(b))
                b[:len(data)] = data
                return len(data)

        headers = {"Content-Length": str(len(body)), **headers}
        raw = urllib3.HTTPResponse(body=Counting(body), headers=headers, status=status,
                                   preload_content=False, decode_content=False,
                                   request_method=request.method)
        return HTTPAdapter().build_response(request, raw)

    def close(self):
        pass


def fake_client(answer, conf_text: str = "", **kw) -> tuple[RegistryClient, FakeTransport]:
    client = fast_client(RegistriesConf.from_string(conf_text), **kw)
    transport = FakeTransport(answer)
    client.session.mount("https://", transport)
    client.session.mount("http://", transport)
    return client, transport


# ---------------------------------------------------------------------------
# registries.conf parsing
# ---------------------------------------------------------------------------

def test_conf_missing_file_is_empty(tmp_path):
    conf = RegistriesConf.load(str(tmp_path / "nope.conf"))
    assert conf.registries == []
    eps = conf.endpoints(parse_reference("alpine"))
    assert eps == [(Endpoint("registry-1.docker.io", "", False, False), "library/alpine")]
    eps = conf.endpoints(parse_reference("quay.io/a/b:1"))
    assert eps == [(Endpoint("quay.io", "", False, False), "a/b")]


def test_conf_syntax_error_names_file(tmp_path):
    (tmp_path / "registries.conf").write_text("[[registry]\nlocation = 1\n")
    with pytest.raises(ConfigError) as exc:
        RegistriesConf.load(str(tmp_path / "registries.conf"))
    assert str(tmp_path / "registries.conf") in str(exc.value)


def test_conf_syntax_error_in_dropin_names_it(tmp_path):
    (tmp_path / "registries.conf").write_text("")
    (tmp_path / "registries.conf.d").mkdir()
    (tmp_path / "registries.conf.d" / "50-bad.conf").write_text("insecure = = true")
    with pytest.raises(ConfigError, match="50-bad.conf"):
        RegistriesConf.load(str(tmp_path / "registries.conf"))


@pytest.mark.parametrize("text, words", [
    ('[[registry]]\nlocation = "a.io"\ninsecure = "yes"\n', "'insecure' must be true or false"),
    ('[[registry]]\ninsecure = true\n', "needs a prefix or a location"),
    ('[[registry]]\nprefix = "*.a.io"\nlocation = "b.io"\n', "wildcard prefix cannot have"),
    ('[[registry]]\nprefix = "a.*.io"\n', "wildcard"),
    ('[[registry]]\nlocation = "https://a.io"\n', "URL scheme"),
    ('[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\ninsecure = true\n', "needs a location"),
    ('[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\nlocation = "m.io"\n'
     'pull-from-mirror = "sometimes"\n', "pull-from-mirror"),
    ('[registries.insecure]\nregistries = ["a.io"]\n[[registry]]\nlocation = "b.io"\n', "mixes"),
    ('[registries.block]\nregistries = "a.io"\n', "list of strings"),
])
def test_conf_bad_values(text, words):
    with pytest.raises(ConfigError, match=words.replace("*", r"\*").replace(".", r"\.")):
        RegistriesConf.from_string(text)


def test_conf_prefix_matching_at_component_boundary():
    conf = RegistriesConf.from_string('''
[[registry]]
prefix = "example.com/foo"
location = "internal.example.com:5000/bar"

[[registry]]
prefix = "example.com"
location = "example.com"
insecure = true

[[registry]]
prefix = "example.com/foo/special"
location = "special.example.com"
''')
    ep, repo = conf.endpoints(parse_reference("example.com/foo/bar:1"))[-1]
    assert (ep.host, ep.path_prefix, repo) == ("internal.example.com:5000", "bar", "bar/bar")
    ep, repo = conf.endpoints(parse_reference("example.com/foo:1"))[-1]
    assert (ep.host, repo) == ("internal.example.com:5000", "bar")
    # "example.com/foobar" is not under "example.com/foo": the shorter prefix applies
    ep, repo = conf.endpoints(parse_reference("example.com/foobar/x"))[-1]
    assert (ep.host, ep.insecure, repo) == ("example.com", True, "foobar/x")
    # the longest prefix wins
    ep, repo = conf.endpoints(parse_reference("example.com/foo/special/x"))[-1]
    assert (ep.host, ep.path_prefix, repo) == ("special.example.com", "", "x")
    # a different host with a common string prefix does not match
    ep, _ = conf.endpoints(parse_reference("example.community/x"))[-1]
    assert (ep.host, ep.insecure) == ("example.community", False)


def test_conf_wildcard_prefix():
    conf = RegistriesConf.from_string('''
[[registry]]
prefix = "*.corp.example"
insecure = true
[[registry.mirror]]
location = "mirror.local/cache"

[[registry]]
location = "exact.corp.example"
''')
    eps = conf.endpoints(parse_reference("a.b.corp.example:5000/team/app"))
    assert [(e.host, e.is_mirror, e.insecure, r) for e, r in eps] == [
        ("mirror.local", True, False, "cache/team/app"),
        ("a.b.corp.example:5000", False, True, "team/app"),
    ]
    # an exact host entry beats a wildcard of the same length
    ep, _ = conf.endpoints(parse_reference("exact.corp.example/app"))[-1]
    assert ep.insecure is False
    # the wildcard needs a subdomain
    ep, _ = conf.endpoints(parse_reference("corp.example/app"))[-1]
    assert ep.insecure is False


def test_conf_mirrors_order_and_rewrite():
    conf = RegistriesConf.from_string('''
[[registry]]
prefix = "docker.io/library"
location = "docker.io/library"
[[registry.mirror]]
location = "mirror-a.local:5000/hub"
insecure = true
[[registry.mirror]]
location = "mirror-b.local"
''')
    eps = conf.endpoints(parse_reference("alpine:3.18"))
    assert [(e.host, e.path_prefix, e.insecure, e.is_mirror, r) for e, r in eps] == [
        ("mirror-a.local:5000", "hub", True, True, "hub/alpine"),
        ("mirror-b.local", "", False, True, "alpine"),
        ("registry-1.docker.io", "library", False, False, "library/alpine"),
    ]


def test_conf_pull_from_mirror_and_digest_only():
    d = "sha256:" + "1" * 64
    conf = RegistriesConf.from_string('''
[[registry]]
location = "a.io"
[[registry.mirror]]
location = "all.io"
[[registry.mirror]]
location = "digest.io"
pull-from-mirror = "digest-only"
[[registry.mirror]]
location = "tag.io"
pull-from-mirror = "tag-only"

[[registry]]
location = "b.io"
mirror-by-digest-only = true
[[registry.mirror]]
location = "bm.io"
''')
    hosts = lambda ref: [e.host for e, _ in conf.endpoints(parse_reference(ref))]  # noqa: E731
    assert hosts("a.io/x:1") == ["all.io", "tag.io", "a.io"]
    assert hosts(f"a.io/x@{d}") == ["all.io", "digest.io", "a.io"]
    assert hosts("b.io/x:1") == ["b.io"]
    assert hosts(f"b.io/x:1@{d}") == ["bm.io", "b.io"]


def test_conf_blocked():
    conf = RegistriesConf.from_string('[[registry]]\nprefix = "evil.io/bad"\nlocation = "evil.io/bad"\n'
                                      'blocked = true\n')
    with pytest.raises(BlockedError, match="evil.io/bad"):
        conf.endpoints(parse_reference("evil.io/bad/app"))
    assert conf.endpoints(parse_reference("evil.io/good/app"))[0][0].host == "evil.io"


def test_conf_v1_format():
    conf = RegistriesConf.from_string('''
[registries.search]
registries = ["docker.io"]
[registries.insecure]
registries = ["local.io:5000"]
[registries.block]
registries = ["bad.io", "local.io:5000/blocked"]
''')
    assert conf.unqualified_search_registries == ["docker.io"]
    ep, _ = conf.endpoints(parse_reference("local.io:5000/app"))[0]
    assert ep.insecure
    with pytest.raises(BlockedError):
        conf.endpoints(parse_reference("bad.io/x"))
    with pytest.raises(BlockedError):
        conf.endpoints(parse_reference("local.io:5000/blocked/x"))


def test_conf_dropins_override_in_lexical_order(tmp_path, monkeypatch):
    (tmp_path / "registries.conf").write_text('''
unqualified-search-registries = ["docker.io"]
[[registry]]
location = "a.io"
insecure = true
[[registry]]
location = "b.io"
''')
    d = tmp_path / "registries.conf.d"
    d.mkdir()
    (d / "20-b.conf").write_text('[[registry]]\nlocation = "a.io"\nblocked = true\n')
    (d / "10-a.conf").write_text('[[registry]]\nlocation = "a.io"\ninsecure = false\n'
                                 '[[registry]]\nlocation = "c.io"\ninsecure = true\n')
    (d / "30-ignored.txt").write_text("not toml at all [")
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(tmp_path / "registries.conf"))
    conf = RegistriesConf.load()
    assert [p.name for p in conf.files] == ["registries.conf", "10-a.conf", "20-b.conf"]
    with pytest.raises(BlockedError, match="20-b.conf"):  # 20-b replaced 10-a's entry
        conf.endpoints(parse_reference("a.io/x"))
    assert conf.endpoints(parse_reference("c.io/x"))[0][0].insecure
    assert conf.endpoints(parse_reference("b.io/x"))[0][0].insecure is False
    assert conf.unqualified_search_registries == ["docker.io"]


def test_conf_default_prefers_the_per_user_file(hermetic_env):
    user = hermetic_env / "home" / ".config" / "containers"
    (user / "registries.conf.d").mkdir(parents=True)
    (user / "registries.conf").write_text('[[registry]]\nlocation = "a.io"\ninsecure = true\n')
    (user / "registries.conf.d" / "x.conf").write_text('[[registry]]\nlocation = "b.io"\n'
                                                        'blocked = true\n')
    conf = RegistriesConf.load()
    assert conf.files == [user / "registries.conf", user / "registries.conf.d" / "x.conf"]
    assert conf.endpoints(parse_reference("a.io/x"))[0][0].insecure
    with pytest.raises(BlockedError):
        conf.endpoints(parse_reference("b.io/x"))


def test_conf_credential_helpers_last_file_wins(tmp_path):
    (tmp_path / "registries.conf").write_text('credential-helpers = ["a", "containers-auth.json"]\n')
    d = tmp_path / "registries.conf.d"
    d.mkdir()
    (d / "10.conf").write_text('[[registry]]\nlocation = "x.io"\n')
    assert RegistriesConf.load(str(tmp_path / "registries.conf")).credential_helpers == [
        "a", "containers-auth.json"]
    (d / "20.conf").write_text('credential-helpers = ["b"]\n')
    assert RegistriesConf.load(str(tmp_path / "registries.conf")).credential_helpers == ["b"]
    assert RegistriesConf.from_string("").credential_helpers is None
    for bad in ('credential-helpers = "a"', 'credential-helpers = ["../evil"]',
                'credential-helpers = ["-x"]', 'credential-helpers = [""]'):
        with pytest.raises(ConfigError, match="credential-helpers"):
            RegistriesConf.from_string(bad)


def test_conf_ignores_aliases_and_unknown_keys(caplog):
    conf = RegistriesConf.from_string('''
short-name-mode = "enforcing"
[aliases]
"alpine" = "docker.io/library/alpine"
[[registry]]
location = "a.io"
surprise = 1
''')
    assert conf.registries[0].location == "a.io"
    assert "surprise" in caplog.text


# ---------------------------------------------------------------------------
# credentials in auth files, challenges
# ---------------------------------------------------------------------------

def test_credentials_repr_hides_secrets():
    c = Credentials("alice", PASSWORD, identity_token="tok-123")
    assert PASSWORD not in repr(c) and "tok-123" not in repr(c) and "alice" in repr(c)
    assert PASSWORD not in str(c) and PASSWORD not in f"{c}"


def test_default_auth_files_order(hermetic_env, monkeypatch):
    t = hermetic_env
    files = default_auth_files()
    assert files == [
        AuthFile(t / "run" / "containers" / "auth.json"),
        AuthFile(t / "config" / "containers" / "auth.json"),
        AuthFile(t / "docker" / "config.json"),
        AuthFile(t / "home" / ".dockercfg", legacy=True),
    ]
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(t / "mine.json"))
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.delenv("DOCKER_CONFIG")
    assert default_auth_files() == [
        AuthFile(t / "mine.json"),
        AuthFile(t / "home" / ".config" / "containers" / "auth.json"),
        AuthFile(t / "home" / ".docker" / "config.json"),
    ]
    monkeypatch.delenv("REGISTRY_AUTH_FILE")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    import os
    assert default_auth_files()[0] == AuthFile(Path(f"/run/containers/{os.getuid()}/auth.json"))


def test_find_credentials_specificity_and_order(tmp_path):
    a = auth_file(tmp_path / "a.json", {
        "reg.io": {"auth": b64auth("host", "p1")},
        "reg.io/team": {"auth": b64auth("team", "p2")},
        "reg.io/team/app": {"auth": b64auth("app", "p3")},
    })
    b = auth_file(tmp_path / "b.json", {
        "other.io": {"auth": b64auth("other", "p4")},
        "reg.io/team/app": {"auth": b64auth("never", "x")},
    })
    files = [AuthFile(a), AuthFile(b)]
    assert find_credentials("reg.io", "team/app", files).username == "app"
    assert find_credentials("reg.io", "team/app/sub", files).username == "app"
    assert find_credentials("reg.io", "team/lib", files).username == "team"
    assert find_credentials("reg.io", "solo", files) == Credentials("host", "p1")
    assert find_credentials("other.io", "x", files).username == "other"  # second file
    assert find_credentials("none.io", "x", files) is None
    # a file earlier in the list wins even with a less specific key
    assert find_credentials("reg.io", "team/app", [AuthFile(b), AuthFile(a)]).username == "never"


def test_find_credentials_schemes_docker_hub_and_legacy(tmp_path):
    docker = auth_file(tmp_path / "config.json", {
        "https://index.docker.io/v1/": {"auth": b64auth("hubber", "hp")},
        "http://insecure.local:5000": {"auth": b64auth("ins", "ip")},
        "tok.io": {"identitytoken": "refresh-xyz"},
        "empty.io": {},
    })
    legacy = tmp_path / ".dockercfg"
    legacy.write_text(json.dumps({"https://legacy.io/v1/": {"auth": b64auth("old", "op"),
                                                            "email": "a@b"}}))
    files = [AuthFile(docker), AuthFile(legacy, legacy=True)]
    assert find_credentials("docker.io", "library/alpine", files).username == "hubber"
    assert find_credentials("registry-1.docker.io", "library/alpine", files).username == "hubber"
    assert find_credentials("insecure.local:5000", "x", files).password == "ip"
    assert find_credentials("tok.io", "x", files) == Credentials("", "", "refresh-xyz")
    assert find_credentials("empty.io", "x", files) is None
    assert find_credentials("legacy.io", "x", files).username == "old"


def test_find_credentials_skips_malformed_files_without_logging_content(tmp_path, caplog):
    bad = tmp_path / "bad.json"
    bad.write_text('{"auths": {"reg.io": {"auth": "' + b64auth("u", PASSWORD) + '"  ')
    bad_entry = auth_file(tmp_path / "entry.json", {"reg.io": {"auth": "!!notbase64" + PASSWORD}})
    good = auth_file(tmp_path / "good.json", {"reg.io": {"auth": b64auth("u", "fine")}})
    with caplog.at_level(logging.DEBUG):
        creds = find_credentials("reg.io", "x", [AuthFile(bad), AuthFile(bad_entry), AuthFile(good)])
    assert creds == Credentials("u", "fine")
    assert "bad.json" in caplog.text and "entry.json" in caplog.text
    assert PASSWORD not in caplog.text and b64auth("u", PASSWORD) not in caplog.text


def test_find_credentials_default_files_follow_env(hermetic_env, monkeypatch):
    t = hermetic_env
    auth_file(t / "docker" / "config.json", {"reg.io": {"auth": b64auth("docker", "d")}})
    assert find_credentials("reg.io", "x").username == "docker"
    auth_file(t / "config" / "containers" / "auth.json", {"reg.io": {"auth": b64auth("xdg", "x")}})
    assert find_credentials("reg.io", "x").username == "xdg"
    auth_file(t / "run" / "containers" / "auth.json", {"reg.io": {"auth": b64auth("run", "r")}})
    assert find_credentials("reg.io", "x").username == "run"
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file(t / "explicit.json", {})))
    assert find_credentials("reg.io", "x").username == "xdg"  # replaces the runtime file


def test_parse_challenges():
    [c] = parse_challenges('Bearer realm="https://auth.example/token",service="reg",'
                           'scope="repository:a/b:pull,push"')
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.example/token", "service": "reg",
                        "scope": "repository:a/b:pull,push"}
    both = parse_challenges('Basic realm="r\\"x", Bearer realm=http://t, error="invalid_token"')
    assert [(c.scheme, c.params) for c in both] == [
        ("basic", {"realm": 'r"x'}), ("bearer", {"realm": "http://t", "error": "invalid_token"})]
    assert parse_challenges("") == []


# ---------------------------------------------------------------------------
# pulling from a real registry
# ---------------------------------------------------------------------------

def test_manifest_by_tag_and_digest(plain, client):
    _, _, image = plain
    m = client.get_manifest(image.ref)
    assert m == Manifest(image.manifest, OCI_MANIFEST, image.digest)
    by_digest = parse_reference(f"{image.ref.name}@{image.digest}")
    assert client.get_manifest(by_digest).data == image.manifest
    assert client.get_manifest(image.ref, image.digest).digest == image.digest


def test_get_blob_verified_and_bounded(plain, client):
    _, _, image = plain
    assert client.get_blob(image.ref, sha(image.config), 1 << 20) == image.config
    with pytest.raises(RegistryError, match="more than the 1000 bytes"):
        client.get_blob(image.ref, sha(image.layer), 1000)


def test_read_range(plain, client):
    reg, _, image = plain
    layer, d = image.layer, sha(image.layer)
    n = len(layer)
    before = reg.mark()
    for start, end in [(0, 1), (0, 100), (12345, 23456), (n - 10, n), (n - 1, n), (0, n), (7, 7)]:
        assert client.read_range(image.ref, d, start, end) == layer[start:end], (start, end)
    wait_accesses(reg, before, lambda a: d in a.uri, n=6)  # their log lines trail the answers
    mark = reg.mark()
    client.read_range(image.ref, d, 1000, 1100)
    partial = wait_accesses(reg, mark, lambda a: a.status == 206)
    assert [(a.method, a.written) for a in partial] == [("GET", 100)]  # only the range


def test_read_tail(plain, client):
    """The last bytes of a blob whose size the reader does not know: one suffix range request."""
    reg, _, image = plain
    layer, d = image.layer, sha(image.layer)
    mark = reg.mark()
    assert client.read_tail(image.ref, d, 1000) == (len(layer) - 1000, layer[-1000:])
    assert client.read_tail(image.ref, d, 10 * len(layer)) == (0, layer)  # a blob shorter than asked: all of it
    answers = wait_accesses(reg, mark, lambda a: d in a.uri, n=2)
    assert [(a.status, a.written) for a in answers] == [(206, 1000), (206, len(layer))]


def test_read_tail_does_not_read_a_whole_blob():
    """A registry that ignores Range (a pull-through cache, for a blob not cached yet) would send
    the whole blob: not read, and no other endpoint asked."""
    blob = random.Random(4).randbytes(4 << 20)
    client, transport = fake_client(lambda req: (200, {}, blob))
    assert client.read_tail(parse_reference("reg.fake/app:v1"), sha(blob), 1000) is None
    assert transport.requests[0].headers["Range"] == "bytes=-1000"
    assert transport.bytes_read < 256 * 1024


def test_read_range_beyond_size(plain, client):
    _, _, image = plain
    d, n = sha(image.layer), len(image.layer)
    with pytest.raises(RegistryError, match="beyond the end") as exc:
        client.read_range(image.ref, d, n - 10, n + 10)
    assert d in str(exc.value) and str(image.ref) in str(exc.value)
    with pytest.raises(RegistryError):
        client.read_range(image.ref, d, n + 100, n + 200)
    with pytest.raises(ValueError):
        client.read_range(image.ref, d, 10, 5)


def test_not_found(plain, client):
    _, _, image = plain
    unknown = sha(b"nothing")
    with pytest.raises(NotFoundError) as exc:
        client.read_range(image.ref, unknown, 0, 10)
    assert unknown in str(exc.value) and str(image.ref) in str(exc.value)
    with pytest.raises(NotFoundError):
        client.get_blob(image.ref, unknown, 100)
    with pytest.raises(NotFoundError, match="manifest nosuchtag"):
        client.get_manifest(image.ref, "nosuchtag")
    with pytest.raises(NotFoundError):
        client.get_manifest(parse_reference(f"{image.ref.registry}/no/such/repo:v1"))


def test_read_range_concurrently(plain, client):
    _, _, image = plain
    d, layer = sha(image.layer), image.layer
    ranges = [(i * 4099 % len(layer), min(len(layer), i * 4099 % len(layer) + 5000))
              for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda r: client.read_range(image.ref, d, *r), ranges))
    assert got == [layer[s:e] for s, e in ranges]


def test_open_stream(plain, client):
    _, _, image = plain
    d = sha(image.layer)
    with client.open_stream(image.ref, d) as s:
        assert b"".join(s) == image.layer
    with client.open_stream(image.ref, d, 123_456) as s:
        assert s.read(10) == image.layer[123_456:123_466]
        assert s.read() == image.layer[123_466:]
        assert s.read() == b""


def test_push_is_idempotent_and_skips_existing_blobs(plain, client):
    reg, _, image = plain
    mark = reg.mark()
    client.push_blob(image.ref, image.layer, sha(image.layer), len(image.layer))
    pushes = wait_accesses(reg, mark, lambda a: a.method in ("HEAD", "POST", "PUT"))
    assert [a.method for a in pushes] == ["HEAD"]
    with pytest.raises(VerificationError):
        client.push_blob(image.ref, b"not the layer", sha(image.layer), 13)
    with pytest.raises(ValueError):
        client.push_blob(image.ref, image.config, sha(image.config), len(image.config) + 1)


def test_secure_endpoint_does_not_fall_back_to_http(plain):
    reg, _, image = plain
    with fast_client(RegistriesConf(), retries=3) as c:  # not marked insecure: TLS only
        with pytest.raises(RegistryError, match="mark it insecure") as exc:
            c.get_manifest(image.ref)
    assert "gave up" not in str(exc.value)  # a TLS failure is not retried


@pytest.fixture
def tls_registry(tmp_path):
    """docker-registry serving HTTPS with a self-signed certificate for 127.0.0.1."""
    pytest.importorskip("cryptography", reason="the test certificate is made with it")
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "tls.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    port = free_port()
    reg = RegistryProcess(port=port, extra={"http": {
        "addr": f"127.0.0.1:{port}",
        "tls": {"certificate": str(tmp_path / "tls.crt"), "key": str(tmp_path / "tls.key")}}})
    try:
        yield reg.start()
    finally:
        reg.cleanup()


def test_insecure_disables_tls_verification(tls_registry, tmp_path, caplog):
    reg = tls_registry
    ref = parse_reference(f"{reg.host}/app:v1")
    with fast_client(RegistriesConf(), retries=3) as c, pytest.raises(RegistryError) as exc:
        c.get_manifest(ref)
    assert "certificate not trusted" in str(exc.value) and "gave up" not in str(exc.value)

    caplog.set_level(logging.INFO, logger="als.registry")
    with fast_client(write_conf(tmp_path, insecure(reg.host))) as c:
        image = push_image(c, ref)
        assert c.read_range(ref, sha(image.layer), 3, 9) == image.layer[3:9]
        assert c.http.schemes == {reg.host: "https"}  # remembered: no plain HTTP for this host
    assert "not verifying its TLS certificate" in caplog.text
    assert "trying plain HTTP" not in caplog.text


# ---------------------------------------------------------------------------
# registries.conf against real registries
# ---------------------------------------------------------------------------

@pytest.fixture
def origin_and_mirror():
    origin, mirror = RegistryProcess(), RegistryProcess()
    try:
        origin.start()
        mirror.start()
        yield origin, mirror
    finally:
        mirror.cleanup()
        origin.cleanup()


def test_mirror_first_then_fallback_to_origin(origin_and_mirror, tmp_path, caplog):
    origin, mirror = origin_and_mirror
    conf = write_conf(tmp_path, mirrored(origin.host, mirror.host) + insecure(mirror.host))
    with fast_client(conf) as c:
        image = push_image(c, parse_reference(f"{origin.host}/app:v1"))  # pushes go to the origin
        push_image(c, parse_reference(f"{mirror.host}/app:v1"))
    only_origin = b"only at the origin"
    d = sha(image.layer)
    caplog.set_level(logging.INFO, logger="als.registry")
    with fast_client(conf) as c:
        c.push_blob(image.ref, only_origin, sha(only_origin), len(only_origin))
        o_mark, m_mark = origin.mark(), mirror.mark()
        assert c.get_manifest(image.ref).digest == image.digest
        assert c.read_range(image.ref, d, 100, 200) == image.layer[100:200]
        reads = wait_accesses(mirror, m_mark, lambda a: a.method == "GET", n=2)
        assert [(a.uri.split("/")[3], a.status) for a in reads] == [("manifests", 200),
                                                                    ("blobs", 206)]
        assert [a for a in origin.accesses_since(o_mark) if a.method == "GET"] == []

        # a blob the mirror lacks (404) comes from the origin
        assert c.get_blob(image.ref, sha(only_origin), 100) == only_origin

        mirror.stop()
        o_mark = origin.mark()
        assert c.read_range(image.ref, d, 5000, 6000) == image.layer[5000:6000]
        assert c.get_manifest(image.ref).data == image.manifest
        reads = wait_accesses(origin, o_mark, lambda a: a.method == "GET" and (
            a.uri.endswith(d) or a.uri.endswith("/manifests/v1")), n=2)
        assert [(a.uri.split("/")[3], a.status) for a in reads] == [("blobs", 206),
                                                                    ("manifests", 200)]
    assert f"trying registry {origin.host} instead" in caplog.text


def test_blocked_and_rewrite_against_real_registry(plain, tmp_path):
    reg, _, image = plain
    conf = write_conf(tmp_path, f'''
[[registry]]
prefix = "images.example.test/team"
location = "{reg.host}/ns"
insecure = true

[[registry]]
prefix = "{reg.host}/ns"
location = "{reg.host}/ns"
blocked = true
''')
    with fast_client(conf) as c:
        aliased = parse_reference("images.example.test/team/app:v1")
        assert c.get_manifest(aliased).digest == image.digest
        assert c.read_range(aliased, sha(image.layer), 0, 50) == image.layer[:50]
        with pytest.raises(BlockedError):
            c.get_manifest(image.ref)


# ---------------------------------------------------------------------------
# authentication
# ---------------------------------------------------------------------------

@pytest.fixture
def basic_registry(tmp_path):
    line = subprocess.run(["htpasswd", "-Bbn", "alice", PASSWORD], check=True,
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "htpasswd").write_text(line + "\n")
    reg = RegistryProcess(extra={"auth": {"htpasswd": {"realm": "r",
                                                       "path": str(tmp_path / "htpasswd")}}})
    try:
        yield reg.start()
    finally:
        reg.cleanup()


def test_basic_auth(basic_registry, tmp_path, monkeypatch, caplog):
    reg = basic_registry
    conf = write_conf(tmp_path, insecure(reg.host))
    ref = parse_reference(f"{reg.host}/app:v1")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(
        auth_file(tmp_path / "auth.json", {reg.host: {"auth": b64auth("alice", PASSWORD)}})))
    caplog.set_level(logging.DEBUG)
    with fast_client(conf) as c:
        image = push_image(c, ref)
        assert c.get_manifest(ref).digest == image.digest
        assert c.read_range(ref, sha(image.layer), 10, 20) == image.layer[10:20]

    auth_file(tmp_path / "auth.json", {reg.host: {"auth": b64auth("alice", "wrong")}})
    with fast_client(conf) as c, pytest.raises(AuthError) as exc:
        c.get_manifest(ref)
    assert "alice" in str(exc.value) and "wrong" not in str(exc.value)

    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "none.json"))
    with fast_client(conf) as c, pytest.raises(AuthError, match="no credentials"):
        c.read_range(ref, sha(image.layer), 0, 1)
    assert PASSWORD not in caplog.text and b64auth("alice", PASSWORD) not in caplog.text


@pytest.fixture
def token_registry():
    pytest.importorskip("cryptography", reason="the test token service signs JWTs with it")
    with running_token_registry({"bob": PASSWORD}) as running:
        yield running


def test_bearer_token_flow(token_registry, tmp_path, monkeypatch, caplog):
    reg, ts = token_registry
    conf = write_conf(tmp_path, insecure(reg.host))
    ref = parse_reference(f"{reg.host}/team/app:v1")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(
        auth_file(tmp_path / "auth.json", {f"{reg.host}/team": {"auth": b64auth("bob", PASSWORD)}})))
    caplog.set_level(logging.DEBUG)
    with fast_client(conf) as c:
        image = push_image(c, ref)
    with fast_client(conf) as c:
        assert c.get_manifest(ref).digest == image.digest
        fetched = ts.count
        assert ts.requests[-1].user == "bob"
        assert ts.requests[-1].granted == [{"type": "repository", "name": "team/app",
                                            "actions": ["pull"]}]
        # the token is cached: more reads, no more token requests
        assert c.read_range(ref, sha(image.layer), 0, 100) == image.layer[:100]
        assert c.get_blob(ref, sha(image.config), 10_000) == image.config
        assert c.get_manifest(ref).data == image.manifest
        assert ts.count == fetched

    assert ts.issued and not any(tok in caplog.text for tok in ts.issued)
    assert PASSWORD not in caplog.text and b64auth("bob", PASSWORD) not in caplog.text

    # an identity token is exchanged with a refresh_token POST
    auth_file(tmp_path / "auth.json", {reg.host: {"identitytoken": "refresh-" + PASSWORD}})
    with fast_client(conf) as c:
        assert c.get_manifest(ref).digest == image.digest
    assert ts.requests[-1].method == "POST" and ts.requests[-1].user == "bob"

    # anonymous: a token without pull access, which the registry refuses
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "none.json"))
    with fast_client(conf) as c, pytest.raises(AuthError) as exc:
        c.get_manifest(ref)
    assert "anonymous" in str(exc.value) and str(ref) in str(exc.value)
    assert ts.requests[-1].user is None and ts.requests[-1].granted[0]["actions"] == []

    # a wrong password is refused by the token service itself
    auth_file(tmp_path / "auth.json", {reg.host: {"auth": b64auth("bob", "nope")}})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    with fast_client(conf) as c, pytest.raises(AuthError, match="token service"):
        c.read_range(ref, sha(image.layer), 0, 1)
    assert PASSWORD not in caplog.text
    assert not any(tok in caplog.text for tok in ts.issued)


def test_revoked_token_is_dropped_and_fetched_again():
    """A 401 answering a cached token drops it and retries once with a new one."""
    state = {"valid": "t1", "issued": 0}
    challenge = 'Bearer realm="https://auth.fake/token",service="svc"'

    def answer(req):
        if req.url.startswith("https://auth.fake/token"):
            state["issued"] += 1
            return 200, {"Content-Type": "application/json"}, json.dumps(
                {"token": f"t{state['issued']}", "expires_in": 300}).encode()
        if req.headers.get("Authorization") != f"Bearer {state['valid']}":
            return 401, {"WWW-Authenticate": challenge}, b""
        return 200, {"Content-Type": OCI_MANIFEST}, b"{}"

    client, transport = fake_client(answer)
    ref = parse_reference("reg.fake/app:v1")
    client.get_manifest(ref)
    client.get_manifest(ref)
    assert state["issued"] == 1  # cached and sent up front
    state["valid"] = "t2"  # the registry no longer accepts t1
    client.get_manifest(ref)
    assert state["issued"] == 2
    state["valid"] = "never"
    with pytest.raises(AuthError):
        client.get_manifest(ref)
    assert state["issued"] == 3  # one retry, not a loop


def test_redirect_does_not_leak_authorization(tmp_path, monkeypatch):
    blob = b"0123456789" * 100
    d = sha(blob)
    seen: list[dict] = []

    class Back(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(dict(self.headers))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 10-19/{len(blob)}")
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.write(blob[10:20])

        def log_message(self, *a):
            pass

    with http_server(Back) as back:
        back_url = f"http://127.0.0.1:{back.server_address[1]}"

        class Front(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if not self.headers.get("Authorization"):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="front"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(307)
                self.send_header("Location", f"{back_url}/storage/{d}")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        with http_server(Front) as front:
            host = f"127.0.0.1:{front.server_address[1]}"
            monkeypatch.setenv("REGISTRY_AUTH_FILE", str(
                auth_file(tmp_path / "auth.json", {host: {"auth": b64auth("u", PASSWORD)}})))
            with fast_client(RegistriesConf.from_string(insecure(host))) as c:
                assert c.read_range(parse_reference(f"{host}/app:v1"), d, 10, 20) == blob[10:20]
    assert len(seen) == 1
    assert "Authorization" not in seen[0] and seen[0]["Range"] == "bytes=10-19"


# ---------------------------------------------------------------------------
# retries, timeouts, odd registries
# ---------------------------------------------------------------------------

def test_stopped_registry_fails_after_bounded_retries(tmp_path, caplog):
    host = f"127.0.0.1:{free_port()}"  # nothing listens there
    caplog.set_level(logging.INFO, logger="als.registry")
    with fast_client(RegistriesConf.from_string(insecure(host)), retries=2) as c:
        with pytest.raises(RegistryError, match="gave up after 3 attempts") as exc:
            c.read_range(parse_reference(f"{host}/app:v1"), sha(b"x"), 0, 10)
    assert "unreachable" in str(exc.value) and sha(b"x") in str(exc.value)
    assert "retry 1/2" in caplog.text and "retry 2/2" in caplog.text


def test_unresponsive_registry_times_out():
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        with fast_client(RegistriesConf.from_string(insecure(host)), connect_timeout=0.3,
                         read_timeout=0.3) as c:
            with pytest.raises(RegistryError, match="timed out.*gave up after 2 attempts"):
                c.get_manifest(parse_reference(f"{host}/app:v1"))


def test_retries_5xx_and_429_but_not_404(caplog):
    calls = {"n": 0}

    def answer(req):
        calls["n"] += 1
        if calls["n"] == 1:
            return 503, {}, b"busy"
        if calls["n"] == 2:
            return 429, {"Retry-After": "0"}, b""
        return 200, {"Content-Type": OCI_MANIFEST}, b"{}"

    caplog.set_level(logging.INFO, logger="als.registry")
    client, _ = fake_client(answer, retries=3)
    assert client.get_manifest(parse_reference("reg.fake/app:v1")).data == b"{}"
    assert calls["n"] == 3
    assert "registry reg.fake answered 503 for manifest v1 of image reg.fake/app:v1; retry 1/3" \
        in caplog.text

    client, transport = fake_client(lambda req: (404, {}, b""), retries=3)
    with pytest.raises(NotFoundError):
        client.get_manifest(parse_reference("reg.fake/app:v1"))
    assert len(transport.requests) == 1


def test_manifest_digest_tampering_is_detected():
    real = b'{"schemaVersion": 2}'
    client, _ = fake_client(lambda req: (200, {"Content-Type": OCI_MANIFEST}, real))
    wrong = sha(b"something else")
    with pytest.raises(VerificationError) as exc:
        client.get_manifest(parse_reference("reg.fake/app:v1"), wrong)
    assert wrong in str(exc.value) and sha(real) in str(exc.value)
    with pytest.raises(VerificationError):
        client.get_manifest(parse_reference(f"reg.fake/app@{wrong}"))
    with pytest.raises(VerificationError):
        client.get_blob(parse_reference("reg.fake/app:v1"), wrong, 1000)
    # by tag, the digest is computed from the bytes
    assert client.get_manifest(parse_reference("reg.fake/app:v1")).digest == sha(real)


def test_registry_ignoring_range_is_read_only_up_to_end():
    blob = random.Random(3).randbytes(4 << 20)

    client, transport = fake_client(lambda req: (200, {}, blob))
    got = client.read_range(parse_reference("reg.fake/app:v1"), sha(blob), 1000, 3000)
    assert got == blob[1000:3000]
    assert transport.requests[0].headers["Range"] == "bytes=1000-2999"
    assert transport.bytes_read < 256 * 1024  # not the whole 4 MiB
    with client.open_stream(parse_reference("reg.fake/app:v1"), sha(blob), 5) as s:
        assert s.read(10) == blob[5:15]


def test_short_range_body_is_an_error():
    def answer(req):
        return 206, {"Content-Range": "bytes 0-99/1000", "Content-Length": "100"}, b"x" * 40

    client, transport = fake_client(answer, retries=1)
    with pytest.raises(RegistryError):
        client.read_range(parse_reference("reg.fake/app:v1"), sha(b"x"), 0, 100)
    assert len(transport.requests) == 2  # a truncated body is retried once
