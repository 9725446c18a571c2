"""Registry access through a real `als serve` mount: auth helper, mirrors, blocking, TLS, secrets.

Each test starts its own registries and store (tests/support/store_process.py)
and reads layers through the FUSE mount as containers/storage would. The
last test is the issue's "done when": Podman pulls and runs an image from a
registry that requires a login, after `podman login` and nothing else.
"""

from __future__ import annotations

import base64
import errno
import io
import json
import os
import random
import subprocess
import sys

import pytest

from als.tools import image as alsimage
from als.ops.control import ControlError, request
from als.reference import parse_reference
from als.registry.credentials.authfiles import AuthFile
from als.registry.credentials.keychain import Keychain
from als.registry.sysregistries import RegistriesConf
from tests.support import images
from tests.support.registry import RegistryProcess, free_port
from tests.support.regtest import (USERS, auth_file, b64auth, fast_client, hermetic_env,  # noqa: F401
                                   htpasswd_registry, insecure, mirrored, requests_seen, settled_lines,
                                   store_config, wait_accesses)
from tests.support.store_process import REPO, StoreProcess
from tests.support.tlsfiles import CA

# No background fetch: these tests decide which bytes are read, and when.
HELLO = b"hello from a private registry\n"


def store_process(workdir, **kw) -> StoreProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    return StoreProcess(workdir, **kw)


def layer_files(seed: int = 1) -> list[images.Entry]:
    """big.bin first (the start of the blob, out of reach of the tail read), then hello.txt."""
    big = random.Random(seed).randbytes(2 << 20)
    return [images.Entry("big.bin", data=big), images.Entry("hello.txt", data=HELLO)]


def push_esgz(client, ref: str, entries: list[images.Entry]) -> alsimage.BuiltLayer:
    layer = alsimage.estargz_layer(io.BytesIO(images.layer_tar(entries)), chunk_size=64 << 10)
    alsimage.push_image(client, parse_reference(ref), [layer])
    return layer


def login(user: str, host: str, tmp_path) -> Keychain:
    """A keychain with ``user``'s login for ``host``, used only to set up images."""
    f = auth_file(tmp_path / f"setup-{user}.json", {host: {"auth": b64auth(user, USERS[user])}})
    return Keychain(auth_files=[AuthFile(f)])


def declined(path) -> int:
    with pytest.raises(OSError) as exc:
        os.stat(path)
    return exc.value.errno


def assert_no_secrets(store: StoreProcess, secrets: list[str]) -> None:
    """Neither the store's log, nor anything under its --root, nor `status` holds a secret."""
    forms = [s.encode() for s in secrets]
    forms += [base64.b64encode(f"{u}:{p}".encode()) for u, p in USERS.items()]
    log = store.log().encode()
    assert log, "the store wrote no log at all"
    assert not [f for f in forms if f in log]
    scanned = 0
    for dirpath, _, names in os.walk(store.root):
        for name in names:
            path = os.path.join(dirpath, name)
            if not os.path.isfile(path):
                continue  # the control socket
            with open(path, "rb") as f:
                data = f.read()
            scanned += 1
            assert not [s for s in forms if s in data], path
    assert scanned > 0, "nothing under --root: the test would prove nothing"
    try:
        status = json.dumps(request(store.root, "status")).encode()
    except ControlError as exc:
        assert "unknown operation" in str(exc)
    else:
        assert not [f for f in forms if f in status]


# The `als-auth-helper` console script, as pip installs it: what registries.conf names.
CONSOLE_SCRIPT = ("-c", "import sys; from als.ops.authhelper import main; sys.exit(main())")


def auth_helper(stdin: str, env: dict | None = None,
                args: tuple[str, ...] = ("-m", "als", "auth-helper")) -> subprocess.CompletedProcess:
    """The helper as containers/image runs it: JSON on stdin, no arguments of Podman's own."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, env=full_env, cwd="/")


# ---------------------------------------------------------------------------
# Podman >= 5.1's additional-layer-store-auth-helper
# ---------------------------------------------------------------------------

def test_auth_helper_gives_the_store_credentials_with_no_auth_files(tmp_path, monkeypatch):
    with htpasswd_registry(tmp_path) as reg:
        conf = tmp_path / "registries.conf"
        conf.write_text(insecure(reg.host))
        with fast_client(RegistriesConf.load(str(conf)), credentials=login("alice", reg.host, tmp_path)) as c:
            first = push_esgz(c, f"{reg.host}/private/app:first", layer_files(1))
            second = push_esgz(c, f"{reg.host}/private/app:second", layer_files(2))
        with store_process(tmp_path / "als", registries_conf=conf, config=store_config()) as store:
            # no auth file anywhere (hermetic HOME, XDG dirs; REGISTRY_AUTH_FILE unset): declined
            ref1 = f"{reg.host}/private/app:first"
            assert declined(store.layer_dir(ref1, first.digest) / "diff") == errno.EIO
            assert "no credentials for it were found" in store.log()

            # what containers/image sends after loading the manifest, with no arguments
            ref2 = f"{reg.host}/private/app:second"
            payload = json.dumps({ref2: {"username": "alice", "password": USERS["alice"]}})
            r = auth_helper(payload, env={"ALS_ROOT": str(store.root)}, args=CONSOLE_SCRIPT)
            assert r.returncode == 0, r.stderr
            assert f"took credentials for {reg.host}/private/app" in r.stderr
            diff = store.layer_dir(ref2, second.digest) / "diff"
            assert (diff / "hello.txt").read_bytes() == HELLO
            assert (diff / "big.bin").read_bytes()[:4096] == layer_files(2)[0].data[:4096]

            # --root works as well; an anonymous entry (no credentials) is accepted and ignored
            r = auth_helper(json.dumps({ref2: {}}),
                            args=("-m", "als", "auth-helper", "--root", str(store.root)))
            assert r.returncode == 0 and r.stderr == ""

            # bad input is refused without echoing it
            for bad in ["not json " + USERS["alice"], json.dumps({"Not A Ref": {"password": USERS["alice"]}}),
                        json.dumps({ref2: {"password": 1}}), json.dumps([USERS["alice"]])]:
                r = auth_helper(bad, env={"ALS_ROOT": str(store.root)})
                assert r.returncode == 1 and r.stderr.startswith("als auth-helper: "), bad
                assert USERS["alice"] not in r.stderr

            # only root (the store's user) may talk to the store: another user cannot connect
            assert oct(os.stat(store.root / "als.sock").st_mode & 0o777) == "0o600"
            probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n"
                     f"    s.connect({str(store.root / 'als.sock')!r})\nexcept PermissionError:\n"
                     "    sys.exit(7)\n")
            r = subprocess.run(["/usr/bin/python3", "-c", probe], user=65534, group=65534,
                               extra_groups=[], capture_output=True, timeout=30, cwd="/")
            assert r.returncode == 7, r.stderr

            # a store that is not running: an error message, never a hang
            r = auth_helper(payload, env={"ALS_ROOT": str(tmp_path / "nowhere")})
            assert r.returncode == 1 and "cannot reach the store" in r.stderr

            assert_no_secrets(store, list(USERS.values()))


def test_tokens_and_passwords_stay_out_of_log_root_status_and_metrics(tmp_path):
    """A token-auth registry read through the store with Podman's auth file; then every place
    the store writes or answers is searched for the password and for every token issued."""
    import urllib.request

    from tests.support.tokenserver import TokenServer

    with TokenServer(users=dict(USERS)) as ts:
        reg = RegistryProcess(extra={"auth": ts.registry_auth()}).start()
        try:
            conf = tmp_path / "registries.conf"
            conf.write_text(insecure(reg.host))
            ref = f"{reg.host}/team/app:v1"
            with fast_client(RegistriesConf.load(str(conf)), credentials=login("bob", reg.host, tmp_path)) as c:
                layer = push_esgz(c, ref, layer_files(8))
            podman_auth = auth_file(tmp_path / "podman-auth.json",
                                    {reg.host: {"auth": b64auth("alice", USERS["alice"])}})
            port = free_port()
            config = store_config() + f'[metrics]\naddress = "127.0.0.1:{port}"\n'
            issued_before = len(ts.issued)
            with store_process(tmp_path / "als", registries_conf=conf, config=config,
                               env={"REGISTRY_AUTH_FILE": str(podman_auth)}) as store:
                diff = store.layer_dir(ref, layer.digest) / "diff"
                assert (diff / "hello.txt").read_bytes() == HELLO
                assert (diff / "big.bin").read_bytes() == layer_files(8)[0].data
                assert [r.user for r in ts.requests[issued_before:]] == ["alice"]
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                    metrics = resp.read()
                assert b"als_registry_fetched_bytes_total" in metrics
                tokens = ts.issued[issued_before:]
                assert tokens
                for secret in [USERS["alice"], *tokens]:
                    assert secret.encode() not in metrics
                assert_no_secrets(store, [USERS["alice"], *tokens])
        finally:
            reg.cleanup()


# ---------------------------------------------------------------------------
# registries.conf through the store
# ---------------------------------------------------------------------------

def test_store_reads_through_a_pull_through_mirror_and_falls_back_to_the_origin(tmp_path):
    with RegistryProcess() as origin, RegistryProcess(extra={"proxy": {"remoteurl": origin.url}}) as cache:
        conf = tmp_path / "registries.conf"
        conf.write_text(mirrored(origin.host, cache.host))
        ref = f"{origin.host}/team/app:v1"
        with fast_client(RegistriesConf.load(str(conf))) as c:
            layer = push_esgz(c, ref, layer_files(3))  # pushed to the origin
        blob = f"/v2/team/app/blobs/{layer.digest}"
        with store_process(tmp_path / "als", registries_conf=conf, config=store_config()) as store:
            c_lines, o_mark = settled_lines(cache), origin.mark()
            diff = store.layer_dir(ref, layer.digest) / "diff"
            assert (diff / "hello.txt").read_bytes() == HELLO
            seen = requests_seen(cache, c_lines, n=3)
            assert ("GET", "/v2/team/app/manifests/v1") in seen and ("GET", blob) in seen
            # the origin served only the cache's own whole-blob fetches, no range of ours
            assert [a for a in origin.accesses_since(o_mark) if a.status == 206] == []

            cache.stop()
            o_mark = origin.mark()
            big = layer_files(3)[0].data
            with open(diff / "big.bin", "rb") as f:
                assert f.read(100_000) == big[:100_000]
            ranges = wait_accesses(origin, o_mark, lambda a: a.uri == blob and a.status == 206)
            assert ranges, "the origin served no range after the mirror went down"
            assert f"trying registry {origin.host} instead" in store.log()


def test_blocked_registry_from_a_dropin_is_declined_with_a_clear_log_line(tmp_path):
    with RegistryProcess() as reg:
        conf = tmp_path / "registries.conf"
        conf.write_text(insecure(reg.host))
        (tmp_path / "registries.conf.d").mkdir()
        (tmp_path / "registries.conf.d" / "50-block.conf").write_text(
            f'[[registry]]\nprefix = "{reg.host}/quarantine"\nlocation = "{reg.host}/quarantine"\n'
            "blocked = true\n")
        with fast_client(RegistriesConf.from_string(insecure(reg.host))) as c:
            bad = push_esgz(c, f"{reg.host}/quarantine/app:v1", layer_files(4))
            good = push_esgz(c, f"{reg.host}/fine/app:v1", layer_files(5))
        with store_process(tmp_path / "als", registries_conf=conf, config=store_config()) as store:
            mark = reg.mark()
            assert declined(store.layer_dir(f"{reg.host}/quarantine/app:v1", bad.digest) / "diff") \
                == errno.EIO
            assert (store.layer_dir(f"{reg.host}/fine/app:v1", good.digest) / "diff" / "hello.txt"
                    ).read_bytes() == HELLO
            line = [x for x in store.log().splitlines() if "quarantine/app:v1" in x and "blocked" in x]
            assert line and f"blocked by registry prefix '{reg.host}/quarantine'" in line[0]
            assert "50-block.conf" in line[0]
            assert not [a for a in reg.accesses_since(mark) if "quarantine" in a.uri]


def test_store_config_certs_dir_global_auth_file_and_kubelet_config(tmp_path):
    """TLS with a private CA and a client certificate from `certs_dir`; credentials from CRI-O's
    global auth file for one namespace, from the kubelet's config.json for the rest."""
    ca, client_ca = CA.create(), CA.create("client CA")
    ca.write_pair("127.0.0.1", tmp_path / "server.crt", tmp_path / "server.key", server=True)
    port = free_port()
    tls = {"certificate": str(tmp_path / "server.crt"), "key": str(tmp_path / "server.key"),
           "clientcas": [str(client_ca.write(tmp_path / "client-ca.pem"))]}
    reg = htpasswd_registry(tmp_path, http={"addr": f"127.0.0.1:{port}", "tls": tls}, )
    reg.port = port
    certs = tmp_path / "certs.d"
    ca.write(certs / reg.host / "ca.crt")
    client_ca.write_pair("als", certs / reg.host / "client.cert", certs / reg.host / "client.key",
                         server=False)
    with reg:
        with fast_client(RegistriesConf(), certs_dir=str(certs),
                         credentials=login("alice", reg.host, tmp_path)) as c:
            team = push_esgz(c, f"{reg.host}/team/app:v1", layer_files(6))
            solo = push_esgz(c, f"{reg.host}/solo/app:v1", layer_files(7))
        crio = auth_file(tmp_path / "crio-auth.json", {f"{reg.host}/team": {"auth": b64auth("alice", USERS["alice"])}})
        kubelet = tmp_path / "kubelet.json"
        kubelet.write_text(json.dumps({"auths": {reg.host: {"auth": b64auth("bob", USERS["bob"])}}}))
        conf = tmp_path / "registries.conf"
        conf.write_text("")  # nothing insecure: TLS is verified
        config = store_config(certs_dir=str(certs), global_auth_file=str(crio), kubelet_config=str(kubelet))
        with store_process(tmp_path / "als", registries_conf=conf, config=config) as store:
            assert (store.layer_dir(f"{reg.host}/team/app:v1", team.digest) / "diff" / "hello.txt"
                    ).read_bytes() == HELLO
            assert (store.layer_dir(f"{reg.host}/solo/app:v1", solo.digest) / "diff" / "hello.txt"
                    ).read_bytes() == HELLO
            log = store.log()
            assert f"credentials for {reg.host}/team/app: user 'alice' from global auth file {crio}" in log
            assert f"credentials for {reg.host}/solo/app: user 'bob' from kubelet config {kubelet}" in log
            assert f"using {certs / reg.host}" in log
            assert_no_secrets(store, list(USERS.values()))


# ---------------------------------------------------------------------------
# Done when: `podman login`, then a lazy pull of a private image, nothing else
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_podman_login_is_all_a_private_image_needs(tmp_path):
    from als.tools.podman import Podman

    unread = random.Random(9).randbytes(4 << 20)
    entries = images.busybox_entries() + [images.Entry("tmp", images.DIR, 0o1777),
                                          images.Entry("hello.txt", data=HELLO),
                                          images.Entry("unread.bin", data=unread)]
    with htpasswd_registry(tmp_path) as reg:
        conf = tmp_path / "registries.conf"
        conf.write_text(insecure(reg.host))
        ref = f"{reg.host}/private/busybox:esgz"
        with fast_client(RegistriesConf.load(str(conf)), credentials=login("alice", reg.host, tmp_path)) as c:
            layer = push_esgz(c, ref, entries)
        podman_dir = tmp_path / "podman"
        # Rootful Podman and a root store share /run/containers/0/auth.json; here Podman's
        # harness names its auth file with REGISTRY_AUTH_FILE, so the store gets the same.
        podman_auth = podman_dir / "conf" / "auth.json"
        with store_process(tmp_path / "als", registries_conf=conf, config=store_config(),
                          env={"REGISTRY_AUTH_FILE": str(podman_auth)}) as store, \
                Podman(podman_dir, additional_layer_store=store.mountpoint,
                       insecure_registries=[reg.host]) as podman:
            assert podman.auth_file == podman_auth
            podman.run("login", "--tls-verify=false", "--username", "alice", "--password-stdin",
                       reg.host, input=USERS["alice"] + "\n")
            mark = reg.mark()
            out = podman.run("run", "--rm", ref, "/bin/busybox", "cat", "/hello.txt").stdout
            assert out.encode() == HELLO
            assert f"layer {layer.digest}: ready" in store.log()
            reads = [a for a in reg.accesses_since(mark) if a.uri.endswith(layer.digest)]
            # the store read ranges of it; Podman itself never downloaded the layer
            assert reads and all(a.status == 206 for a in reads), reads
            assert sum(a.written for a in reads) < layer.size - len(unread) // 2
            assert_no_secrets(store, [USERS["alice"]])
