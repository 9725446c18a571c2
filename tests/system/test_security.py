"""Who can reach what: the mount, the control socket, the cache and state; credentials never leak.

The store runs as root under every container. Other local users must not
read the cached content of private images, plant or swap files in the cache,
walk the store's namespace, or talk to the control socket (credentials pass
through it). The probes run as `nobody` (setpriv) against a store whose
parent directory is world-traversable and whose root was created 0755 the
way a package would, started under umask 0, so only the store's own modes
stand between `nobody` and its files; a readable control file proves the
probe itself can see what it is allowed to. See README "Threat model".
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from als.ops.control import request
from als.tools.image import estargz_layer, push_image
from als.reference import parse_reference
from als.registry.client import RegistryClient
from als.registry.sysregistries import RegistriesConf
from tests.support.registry import RegistryProcess, free_port
from tests.support.store_process import REPO, StoreProcess, write_registries_conf

NOBODY = 65534
PROBE = r"""
import errno, json, os, socket, sys
out = {}
for name, (kind, path) in json.loads(sys.argv[1]).items():
    try:
        if kind == "list":
            os.listdir(path)
        elif kind == "stat":
            os.stat(path)
        elif kind == "read":
            with open(path, "rb") as f:
                f.read(1)
        elif kind == "write":
            with open(path, "wb") as f:
                f.write(b"planted")
        elif kind == "mkdir":
            os.mkdir(path)
        elif kind == "rename":
            os.rename(path, path + ".moved")
        elif kind == "connect":
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            s.connect(path)
            try:
                s.sendall(b'{"op": "status"}\n')
            except OSError:
                pass  # the daemon may answer and close before reading
            out[name] = s.recv(65536).decode() or "closed"
            continue
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out))
"""


def as_nobody(targets: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Run the probe as uid/gid 65534 with no supplementary groups; return what each attempt got."""
    out = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                          "/usr/bin/python3", "-I", "-c", PROBE, json.dumps(targets)],
                         capture_output=True, text=True, timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def open_parent():
    """A world-traversable directory for the store (pytest's own temp dirs are root-only)."""
    d = Path(tempfile.mkdtemp(prefix="als-security-", dir="/tmp"))
    os.chmod(d, 0o755)
    (d / "public.txt").write_text("anyone may read this\n")
    os.chmod(d / "public.txt", 0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def image(registry, client):
    data = b"private content\n" * 1000
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("secret")
        info.size = len(data)
        info.mode = 0o644
        tf.addfile(info, io.BytesIO(data))
    layer = estargz_layer(io.BytesIO(buf.getvalue()), chunk_size=4096)
    ref = f"{registry.host}/security/private:v1"
    push_image(client, parse_reference(ref), [layer])
    return ref, layer, data


@pytest.fixture(scope="module")
def store(open_parent, registries_conf, image):
    root = open_parent / "root"
    root.mkdir(mode=0o755)  # as a package would create /var/lib/als
    os.chmod(root, 0o755)
    s = StoreProcess(open_parent, registries_conf=registries_conf, config="[fetch]\nbackground = false\n")
    with umask(0):
        s.start()
    try:
        ref, layer, data = image
        assert (s.layer_dir(ref, layer.digest) / "diff" / "secret").read_bytes() == data  # fills the cache
        yield s
    finally:
        s.stop()


def test_nothing_the_store_creates_is_open_to_other_users_whatever_the_umask(store):
    """Started under umask 0 with a 0755 root: every directory and file the daemon made is owner-only."""
    loose = []
    for p in [store.root, *store.root.rglob("*")]:
        st = os.lstat(p)
        if p == store.root:
            continue  # the administrator's directory: the store only refuses it if others may write
        if st.st_mode & 0o077:
            loose.append(f"{p.relative_to(store.root)} {stat.filemode(st.st_mode)}")
    assert not loose, loose
    assert stat.S_IMODE(os.stat(store.root / "als.sock").st_mode) == 0o600


def test_other_users_reach_nothing_of_the_store(store, image, open_parent):
    ref, layer, _ = image
    chunk = next((store.root / "cache" / "packs").glob("*.pack"))
    toc = next((store.root / "state" / "tocs").iterdir())
    layer_dir = store.layer_dir(ref, layer.digest)
    targets = {
        "control: a public file": ("read", str(open_parent / "public.txt")),
        "mount: list the root": ("list", str(store.mountpoint)),
        "mount: stat a layer": ("stat", str(layer_dir / "diff")),
        "mount: read a file": ("read", str(layer_dir / "diff" / "secret")),
        "mount: read info": ("read", str(layer_dir / "info")),
        "mount: read blob": ("read", str(layer_dir / "blob")),
        "mount: create": ("mkdir", str(store.mountpoint / "planted")),
        # (listing the 0755 root itself shows only "cache", "state" and "als.sock": the administrator's choice)
        "cache: list": ("list", str(store.root / "cache")),
        "cache: list packs": ("list", str(store.root / "cache" / "packs")),
        "cache: read a pack": ("read", str(chunk)),
        "cache: plant a pack": ("write", str(chunk.parent / ("f" * 16 + ".pack"))),
        "cache: swap the packs dir": ("rename", str(store.root / "cache" / "packs")),
        "state: read a TOC": ("read", str(toc)),
        "state: list": ("list", str(store.root / "state")),
        "control socket": ("connect", str(store.root / "als.sock")),
    }
    got = as_nobody(targets)
    assert got.pop("control: a public file") == "ok", "the probe cannot even read a public file"
    allowed = {"EACCES", "EPERM"}
    assert all(v in allowed for v in got.values()), {k: v for k, v in got.items() if v not in allowed}


def test_the_control_socket_refuses_other_users_even_if_its_file_is_opened_up(store):
    """SO_PEERCRED is checked too: defence in depth behind the 0600 mode and the 0700 root."""
    sock = store.root / "als.sock"
    root_mode = stat.S_IMODE(os.stat(store.root).st_mode)
    os.chmod(store.root, 0o711)
    os.chmod(sock, 0o666)
    try:
        got = as_nobody({"control socket": ("connect", str(sock))})
    finally:
        os.chmod(sock, 0o600)
        os.chmod(store.root, root_mode)
    answer = json.loads(got["control socket"])
    assert answer == {"ok": False, "error": f"uid {NOBODY} may not use the control socket"}
    assert request(store.root, "ping") == "pong"


def test_a_root_other_users_may_write_is_refused(registries_conf, open_parent):
    work = open_parent / "writable"
    work.mkdir()
    (work / "root").mkdir()
    os.chmod(work / "root", 0o777)  # anyone could swap cache/ or state/ for a symlink to /etc
    s = StoreProcess(work, registries_conf=registries_conf)
    try:
        with pytest.raises(RuntimeError, match="exited 1"):
            s.start(timeout=20)
    finally:
        s.stop()  # (if it did start, it must not outlive the test)
    assert "not writable by other users" in s.log()


def test_the_daemon_never_dumps_core(registries_conf, tmp_path):
    """Credentials live in its memory, so it must not leave them in a core file.

    The kernel decides: with RLIMIT_CORE raised, SIGABRT dumps core unless the
    process made itself non-dumpable; waitid tells which (CLD_DUMPED or not).
    """
    s = StoreProcess(tmp_path, registries_conf=registries_conf).start()
    started = time.time()
    try:
        pid = s.proc.pid
        resource.prlimit(pid, resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        os.kill(pid, signal.SIGABRT)
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    finally:
        s.stop()
        for core in REPO.glob("core*"):  # where core_pattern "core" would put one
            if core.is_file() and core.stat().st_mtime >= started - 1:
                core.unlink()
    assert info.si_status == signal.SIGABRT
    assert info.si_code == os.CLD_KILLED, "the daemon dumped core"


# ---- credentials ------------------------------------------------------------------------------
PASSWORD = "s3cr3t-Pa55-" + os.urandom(6).hex()


def test_no_credential_reaches_logs_status_metrics_errors_or_files(tmp_path):
    line = subprocess.run(["htpasswd", "-Bbn", "alice", PASSWORD], check=True, capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "htpasswd").write_text(line + "\n")
    reg = RegistryProcess(extra={"auth": {"htpasswd": {"realm": "r", "path": str(tmp_path / "htpasswd")}}})
    secrets = [PASSWORD, base64.b64encode(f"alice:{PASSWORD}".encode()).decode(), "Basic "]
    auth = tmp_path / "auth.json"
    good = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    with reg:
        auth.write_text(json.dumps({"auths": {reg.host: {"auth": good}}}))
        conf = write_registries_conf(tmp_path / "registries.conf", [reg.host])
        env_before = os.environ.get("REGISTRY_AUTH_FILE")
        os.environ["REGISTRY_AUTH_FILE"] = str(auth)
        try:
            client = RegistryClient(RegistriesConf.load(str(conf)), retries=1)
            data = os.urandom(20_000)
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tf:
                info = tarfile.TarInfo("f")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            layer = estargz_layer(io.BytesIO(buf.getvalue()), chunk_size=8192)
            ref = f"{reg.host}/private/app:v1"
            push_image(client, parse_reference(ref), [layer])
        finally:
            if env_before is None:
                os.environ.pop("REGISTRY_AUTH_FILE", None)
            else:
                os.environ["REGISTRY_AUTH_FILE"] = env_before
        port = free_port()
        config = f'[fetch]\nbackground = false\n[metrics]\naddress = "127.0.0.1:{port}"\n'
        (tmp_path / "als").mkdir()
        s = StoreProcess(tmp_path / "als", registries_conf=conf, config=config,
                         env={"REGISTRY_AUTH_FILE": str(auth)})
        with s:
            assert (s.layer_dir(ref, layer.digest) / "diff" / "f").read_bytes() == data  # the creds work
            # A wrong password and an unknown user: errors must name the user, never the secret.
            auth.write_text(json.dumps({"auths": {reg.host: {
                "auth": base64.b64encode(f"alice:{PASSWORD}-wrong".encode()).decode()}}}))
            with pytest.raises(OSError):
                os.stat(s.layer_dir(f"{reg.host}/private/other:v1", layer.digest) / "diff")
            status = json.dumps(request(s.root, "status"))
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                metrics = r.read().decode()
            pid = s.proc.pid
            proc_text = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
        log = s.log()
        assert "refused user 'alice'" in log or "denied access" in log
        files = b"".join(p.read_bytes() for p in s.root.rglob("*") if p.is_file())
        for secret in secrets:
            for where, text in [("log", log), ("status", status), ("metrics", metrics),
                                ("/proc cmdline and environ", proc_text.decode(errors="replace")),
                                ("cache and state", files.decode("latin-1"))]:
                assert secret not in text, f"{secret[:6]}... appears in the {where}"
