"""Credentials and tokens against real docker-registry processes.

Which credentials the store sent is read off the real token service
(tests/support/tokenserver.py), which records the user of every token
request, or off an htpasswd registry that refuses anything else. Credential
helpers are real programs on PATH (docker-credential-<name>, written by the
test) that record each call.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from als.errors import AuthError
from als.reference import parse_reference
from als.registry.credentials.authfiles import AuthFile, find_credentials
from als.registry.credentials.entries import Credentials
from als.registry.credentials.keychain import Keychain
from als.registry.credentials.kubelet import kubelet_credentials
from tests.support.registry import RegistryProcess
from tests.support.regtest import (PASSWORD, running_token_registry, auth_file, auth_refusals, b64auth, fast_client,  # noqa: F401
                                   hermetic_env, insecure, log_lines, push_image, sha,
                                   wait_accesses, write_conf)

USERS = {"alice": PASSWORD + "-a", "bob": PASSWORD + "-b", "carol": PASSWORD + "-c",
         "dave": PASSWORD + "-d"}


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------

@pytest.fixture
def token_registry():
    """docker-registry in token-auth mode with our token service; every user may pull and push."""
    with running_token_registry(USERS) as running:
        yield running


@pytest.fixture
def helpers_bin(tmp_path, monkeypatch):
    """A directory on PATH for docker-credential-<name> programs written by the test."""
    d = tmp_path / "bin"
    d.mkdir()
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ.get('PATH', '')}")
    return d


def make_helper(bin_dir: Path, name: str, answers: dict[str, dict], sleep: float = 0.0) -> Path:
    """A real docker-credential-<name>: ``answers`` maps a server to {"Username", "Secret"}.

    Every call appends "<argv> <stdin>" to <bin>/<name>.calls; an unknown
    server gets the protocol's "credentials not found" answer.
    """
    (bin_dir / f"{name}.json").write_text(json.dumps(answers))
    prog = bin_dir / f"docker-credential-{name}"
    prog.write_text(f"""#!{sys.executable}
import json, pathlib, sys, time
here = pathlib.Path(__file__).parent
server = sys.stdin.read()
with open(here / "{name}.calls", "a") as f:
    f.write(" ".join(sys.argv[1:]) + " " + server + "\\n")
time.sleep({sleep})
answers = json.loads((here / "{name}.json").read_text())
if server not in answers:
    print("credentials not found in native keychain")
    sys.exit(1)
print(json.dumps(dict(ServerURL=server, **answers[server])))
""")
    prog.chmod(prog.stat().st_mode | stat.S_IXUSR)
    return prog


def calls(bin_dir: Path, name: str) -> list[str]:
    f = bin_dir / f"{name}.calls"
    return f.read_text().splitlines() if f.exists() else []


def pusher(reg, tmp_path) -> Keychain:
    """A keychain holding alice's login, only for setting up images."""
    return Keychain(helpers=["containers-auth.json"],
                    auth_files=[AuthFile(auth_file(tmp_path / "setup-auth.json", {
                        reg.host: {"auth": b64auth("alice", USERS["alice"])}}))])


def token_user(ts) -> str | None:
    """The user of the last token request that the token service granted."""
    granted = [r for r in ts.requests if r.granted]
    return granted[-1].user if granted else None


# ---------------------------------------------------------------------------
# credential helpers, in Podman's order
# ---------------------------------------------------------------------------

def test_cred_helpers_and_creds_store_in_podman_file_order(token_registry, tmp_path, monkeypatch,
                                                           helpers_bin, hermetic_env, caplog):
    reg, ts = token_registry
    conf = write_conf(tmp_path, insecure(reg.host))
    ref = parse_reference(f"{reg.host}/team/app:v1")
    with fast_client(conf, credentials=pusher(reg, tmp_path)) as c:
        image = push_image(c, ref)
    d = sha(image.layer)
    caplog.set_level(logging.DEBUG)

    # 1. REGISTRY_AUTH_FILE (read first) sends us to helper "alpha" for this registry
    first = auth_file(tmp_path / "first.json", {})
    first.write_text(json.dumps({"credHelpers": {reg.host: "alpha"}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(first))
    make_helper(helpers_bin, "alpha", {reg.host: {"Username": "bob", "Secret": USERS["bob"]}})
    # ... ahead of an auths entry in a later file (XDG_CONFIG_HOME's auth.json)
    auth_file(hermetic_env / "config" / "containers" / "auth.json",
              {reg.host: {"auth": b64auth("carol", USERS["carol"])}})
    with fast_client(conf) as c:
        assert c.read_range(ref, d, 0, 100) == image.layer[:100]
    assert token_user(ts) == "bob"
    assert calls(helpers_bin, "alpha") == [f"get {reg.host}"]  # the protocol: "get", host on stdin

    # 2. the helper has nothing: the next file's auths entry answers
    make_helper(helpers_bin, "alpha", {})
    with fast_client(conf) as c:
        assert c.read_range(ref, d, 0, 100) == image.layer[:100]
    assert token_user(ts) == "carol"

    # 3. credsStore (Docker's default helper) of a file with no entry for the registry
    auth_file(hermetic_env / "config" / "containers" / "auth.json", {})
    docker = hermetic_env / "docker" / "config.json"
    docker.parent.mkdir(parents=True)
    docker.write_text(json.dumps({"auths": {"other.example": {}}, "credsStore": "beta"}))
    make_helper(helpers_bin, "beta", {reg.host: {"Username": "dave", "Secret": USERS["dave"]}})
    with fast_client(conf) as c:
        assert c.get_manifest(ref).digest == image.digest
    assert token_user(ts) == "dave"

    # 4. registries.conf credential-helpers: a helper before the auth files
    make_helper(helpers_bin, "gamma", {reg.host: {"Username": "<token>",
                                                  "Secret": "refresh-" + PASSWORD}})
    conf = write_conf(tmp_path, 'credential-helpers = ["gamma", "containers-auth.json"]\n'
                      + insecure(reg.host))
    with fast_client(conf) as c:
        assert c.read_range(ref, d, 5, 50) == image.layer[5:50]
    # "<token>" means an identity token: exchanged with a refresh_token POST, as bob
    assert ts.requests[-1].method == "POST" and token_user(ts) == "bob"
    assert calls(helpers_bin, "beta") == [f"get {reg.host}"]  # not asked again: gamma answered

    secrets = [*USERS.values(), "refresh-" + PASSWORD, *ts.issued]
    assert not any(s in caplog.text for s in secrets)


def test_a_hung_or_broken_helper_is_bounded_and_skipped(token_registry, tmp_path, monkeypatch,
                                                        helpers_bin, caplog):
    reg, ts = token_registry
    ref = parse_reference(f"{reg.host}/app:v1")
    with fast_client(write_conf(tmp_path, insecure(reg.host)), credentials=pusher(reg, tmp_path)) as c:
        image = push_image(c, ref)
    make_helper(helpers_bin, "slow", {reg.host: {"Username": "bob", "Secret": USERS["bob"]}},
                sleep=30)
    make_helper(helpers_bin, "fine", {reg.host: {"Username": "carol", "Secret": USERS["carol"]}})
    broken = helpers_bin / "docker-credential-broken"
    broken.write_text("#!/bin/sh\necho 'cannot open keyring: locked'\nexit 3\n")
    broken.chmod(0o755)
    conf = write_conf(tmp_path, 'credential-helpers = ["slow", "broken", "missing", "fine"]\n'
                      + insecure(reg.host))
    keychain = Keychain(helpers=conf.credential_helpers, helper_timeout=1.0)
    caplog.set_level(logging.WARNING, logger="als.registry")
    t0 = time.monotonic()
    with fast_client(conf, credentials=keychain) as c:
        assert c.get_manifest(ref).digest == image.digest
    assert time.monotonic() - t0 < 10
    assert token_user(ts) == "carol"
    assert "docker-credential-slow did not answer" in caplog.text
    assert "docker-credential-broken failed" in caplog.text and "keyring: locked" in caplog.text
    assert "docker-credential-missing is not installed" in caplog.text
    # answers are kept briefly: a second lookup runs no helper again
    assert keychain.helper_cache.calls == 4
    keychain(reg.host, "app")
    assert keychain.helper_cache.calls == 4


def test_auth_file_keys_by_registry_namespace_and_repository(token_registry, tmp_path, monkeypatch):
    reg, ts = token_registry
    conf = write_conf(tmp_path, insecure(reg.host))
    refs = {name: parse_reference(f"{reg.host}/{name}:v1") for name in ("team/app", "team/lib", "solo")}
    with fast_client(conf, credentials=pusher(reg, tmp_path)) as c:
        images = {name: push_image(c, r, seed=i) for i, (name, r) in enumerate(refs.items())}
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file(tmp_path / "auth.json", {
        reg.host: {"auth": b64auth("alice", USERS["alice"])},
        f"{reg.host}/team": {"auth": b64auth("bob", USERS["bob"])},
        f"{reg.host}/team/app": {"auth": b64auth("carol", USERS["carol"])},
    })))
    with fast_client(conf) as c:
        for name, user in [("team/app", "carol"), ("team/lib", "bob"), ("solo", "alice")]:
            img = images[name]
            assert c.read_range(refs[name], sha(img.layer), 0, 10) == img.layer[:10]
            assert token_user(ts) == user, name
            assert ts.requests[-1].scopes == [f"repository:{name}:pull"]


# ---------------------------------------------------------------------------
# bearer tokens
# ---------------------------------------------------------------------------

def test_bearer_tokens_cached_per_scope_until_they_expire(token_registry, tmp_path, monkeypatch):
    reg, ts = token_registry
    ts.ttl = 2  # seconds; als renews a token at 80 % of its life
    conf = write_conf(tmp_path, insecure(reg.host))
    a, b = parse_reference(f"{reg.host}/a:v1"), parse_reference(f"{reg.host}/b:v1")
    with fast_client(conf, credentials=pusher(reg, tmp_path)) as c:
        ia, ib = push_image(c, a, seed=1), push_image(c, b, seed=2)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file(
        tmp_path / "auth.json", {reg.host: {"auth": b64auth("bob", USERS["bob"])}})))
    with fast_client(conf) as c:
        n = ts.count
        for i in range(5):
            assert c.read_range(a, sha(ia.layer), i, i + 10) == ia.layer[i:i + 10]
        assert c.get_blob(b, sha(ib.config), 10_000) == ib.config
        assert c.get_manifest(b).digest == ib.digest
        assert [r.scopes for r in ts.requests[n:]] == [["repository:a:pull"], ["repository:b:pull"]]

        time.sleep(2.1)  # both tokens are past their renewal time now
        mark, lines = reg.mark(), log_lines(reg)
        assert c.read_range(a, sha(ia.layer), 50, 60) == ia.layer[50:60]
        assert [r.scopes for r in ts.requests[n + 2:]] == [["repository:a:pull"]]
        # renewed before use: the registry refused nothing
        assert [x.status for x in wait_accesses(reg, mark, lambda x: True)] == [206]
        assert auth_refusals(reg, lines) == []


def test_bearer_token_refused_by_the_registry_is_fetched_again(token_registry, tmp_path, monkeypatch):
    reg, ts = token_registry
    conf = write_conf(tmp_path, insecure(reg.host))
    ref = parse_reference(f"{reg.host}/app:v1")
    with fast_client(conf, credentials=pusher(reg, tmp_path)) as c:
        image = push_image(c, ref)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file(
        tmp_path / "auth.json", {reg.host: {"auth": b64auth("bob", USERS["bob"])}})))
    with fast_client(conf) as c:
        assert c.read_range(ref, sha(image.layer), 0, 10) == image.layer[:10]
        n = ts.count
        # The token service's key changes and the registry trusts only the new one:
        # the token we cache (valid for 5 more minutes by its expires_in) is now refused.
        ts.rotate_key()
        reg.stop()
        reg.start()
        mark, lines = reg.mark(), log_lines(reg)
        assert c.read_range(ref, sha(image.layer), 10, 20) == image.layer[10:20]
        assert ts.count == n + 1  # exactly one new token
        blob = f"/v2/app/blobs/{sha(image.layer)}"
        assert auth_refusals(reg, lines) == [blob]  # the old token, refused once
        assert [(x.uri, x.status) for x in wait_accesses(reg, mark, lambda x: True)] == [(blob, 206)]
        assert c.read_range(ref, sha(image.layer), 20, 30) == image.layer[20:30]
        assert ts.count == n + 1  # and the new one is cached


def test_anonymous_tokens_when_there_are_no_credentials(tmp_path):
    from tests.support.tokenserver import TokenServer

    with TokenServer(users=dict(USERS), anonymous_actions=("pull",)) as ts:
        reg = RegistryProcess(extra={"auth": ts.registry_auth()}).start()
        try:
            conf = write_conf(tmp_path, insecure(reg.host))
            ref = parse_reference(f"{reg.host}/public/app:v1")
            with fast_client(conf, credentials=pusher(reg, tmp_path)) as c:
                image = push_image(c, ref)
            n = ts.count
            with fast_client(conf) as c:  # hermetic: no auth file anywhere
                assert c.get_manifest(ref).digest == image.digest
                assert c.read_range(ref, sha(image.layer), 7, 70) == image.layer[7:70]
            assert [(r.user, r.granted[0]["actions"]) for r in ts.requests[n:]] == [(None, ["pull"])]
            with fast_client(conf) as c, pytest.raises(AuthError):  # an anonymous push is refused
                push_image(c, parse_reference(f"{reg.host}/public/other:v1"), seed=9)
        finally:
            reg.cleanup()


# ---------------------------------------------------------------------------
# CRI-O: the global auth file and the kubelet's config.json
# ---------------------------------------------------------------------------

def test_crio_global_auth_file_podman_files_and_kubelet_config_precedence(token_registry, tmp_path,
                                                                          monkeypatch):
    reg, ts = token_registry
    conf = write_conf(tmp_path, insecure(reg.host))
    ref = parse_reference(f"{reg.host}/team/app:v1")
    with fast_client(conf, credentials=pusher(reg, tmp_path)) as c:
        image = push_image(c, ref)
    host, port = reg.host.split(":")
    glob = ".".join(host.split(".")[:3] + ["*"]) + f":{port}"  # "127.0.0.*:<port>"
    global_file = auth_file(tmp_path / "crio-auth.json", {reg.host: {"auth": b64auth("bob", USERS["bob"])}})
    podman_file = auth_file(tmp_path / "podman-auth.json",
                            {f"{reg.host}/team": {"auth": b64auth("alice", USERS["alice"])}})
    kubelet = tmp_path / "kubelet" / "config.json"
    kubelet.parent.mkdir()
    kubelet.write_text(json.dumps({"auths": {
        f"https://{glob}/v1/": {"username": "carol", "password": USERS["carol"]},
        f"{reg.host}/elsewhere": {"username": "dave", "password": USERS["dave"]},
    }}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(podman_file))

    def user_for_read() -> str | None:
        keychain = Keychain(global_auth_file=global_file, kubelet_config=kubelet)
        with fast_client(conf, credentials=keychain) as c:
            assert c.read_range(ref, sha(image.layer), 0, 16) == image.layer[:16]
        return token_user(ts)

    assert user_for_read() == "bob"  # CRI-O's global auth file first
    auth_file(global_file, {})
    assert user_for_read() == "alice"  # then Podman's auth files
    auth_file(podman_file, {})
    assert user_for_read() == "carol"  # then the kubelet's, matched by its glob key
    # the kubelet's own rules: one label per glob, equal ports, path prefixes at "/"
    assert kubelet_credentials(kubelet, reg.host, "team/app").username == "carol"
    assert kubelet_credentials(kubelet, f"127.0.0.1.5:{port}", "x") is None
    assert kubelet_credentials(kubelet, f"{host}:1", "x") is None
    assert kubelet_credentials(kubelet, reg.host, "elsewhere/x").username == "dave"
    assert kubelet_credentials(kubelet, reg.host, "elsewhereelse/x").username == "carol"


def test_pushed_credentials_order(token_registry, tmp_path, monkeypatch):
    """What `als auth-helper` passed wins for its repository, and only backs up the files elsewhere."""
    reg, ts = token_registry
    conf = write_conf(tmp_path, insecure(reg.host))
    app, lib = parse_reference(f"{reg.host}/app:v1"), parse_reference(f"{reg.host}/lib:v1")
    with fast_client(conf, credentials=pusher(reg, tmp_path)) as c:
        ia, il = push_image(c, app, seed=1), push_image(c, lib, seed=2)
    podman_file = auth_file(tmp_path / "auth.json", {reg.host: {"auth": b64auth("alice", USERS["alice"])}})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(podman_file))
    keychain = Keychain()
    keychain.pushed.add(f"{reg.host}/app:v1", Credentials("bob", USERS["bob"]))
    assert "bob" not in repr(keychain) and USERS["bob"] not in repr(keychain)
    with fast_client(conf, credentials=keychain) as c:
        assert c.read_range(app, sha(ia.layer), 0, 4) == ia.layer[:4]
        assert token_user(ts) == "bob"
        assert c.read_range(lib, sha(il.layer), 0, 4) == il.layer[:4]
        assert token_user(ts) == "alice"
    auth_file(podman_file, {})
    with fast_client(conf, credentials=keychain) as c:
        assert c.read_range(lib, sha(il.layer), 0, 4) == il.layer[:4]
        assert token_user(ts) == "bob"  # the same registry's pushed login, as a last resort


def test_find_credentials_cred_helpers_are_keyed_by_host_only(tmp_path, helpers_bin):
    """containers/image asks credHelpers by registry host: no per-namespace helper entries."""
    make_helper(helpers_bin, "h", {"reg.io": {"Username": "u", "Secret": "s"}})
    f = tmp_path / "auth.json"
    f.write_text(json.dumps({"credHelpers": {"reg.io/team": "h"}}))
    assert find_credentials("reg.io", "team/app", [AuthFile(f)]) is None
    f.write_text(json.dumps({"credHelpers": {"reg.io": "h", "bad": "../x"}}))
    assert find_credentials("reg.io", "team/app", [AuthFile(f)]) == Credentials("u", "s")
    assert calls(helpers_bin, "h") == ["get reg.io"]


def test_helper_runs_with_a_bounded_timeout(helpers_bin):
    from als.registry.credentials.credhelper import HelperError, helper_get

    make_helper(helpers_bin, "sleepy", {"x.io": {"Username": "u", "Secret": "s"}}, sleep=20)
    t0 = time.monotonic()
    with pytest.raises(HelperError, match="did not answer for x.io within 0.5s"):
        helper_get("sleepy", "x.io", timeout=0.5)
    assert time.monotonic() - t0 < 5
    r = subprocess.run(["pgrep", "-f", str(helpers_bin / "docker-credential-sleepy")],
                       capture_output=True, text=True)
    assert r.stdout.strip() == ""  # the helper was killed, not left behind
