"""A throwaway unprivileged user with subuid/subgid ranges, for rootless Podman tests.

``RootlessUser`` creates the user with ``useradd`` (which gives it the next
free 65536-id ranges in /etc/subuid and /etc/subgid), runs commands as that
user, and on ``close()`` kills every process still running under its uid (by
PID: the rootless "pause" process Podman leaves behind, a store) and removes
the user, its home and its id ranges with ``userdel -r``.

Two things of this machine kind are dealt with, both undone on close and
neither visible outside the test's own processes:

* ``/dev/fuse`` is mode 0600 here (no udev rule ran); Debian's fuse3 makes it
  0666 on a normal system, so it is set to 0666 for the test and restored.
* The interpreter may live under a directory the user cannot enter (pyenv in
  /root, mode 0700). Every command then runs in a private mount namespace in
  which that directory is replaced by a tmpfs holding only a bind mount of the
  interpreter's prefix, at the same path: the binary's absolute RPATH still
  resolves and nothing on the host changes.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.store_process import REPO

# containers.conf for a rootless user here: no network namespace (no slirp4netns needed), runc,
# cgroupfs and files for events (no systemd user session).
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def make_user(prefix: str) -> "RootlessUser":
    """A new user named ``<prefix>-<pid>``, or the test is skipped where this machine cannot make one."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("newuidmap"):
        pytest.skip("needs root, useradd and newuidmap (Debian: uidmap) to make a rootless user")
    return RootlessUser(f"{prefix}-{os.getpid() % 100000}")


def _hidden_ancestor(path: Path) -> Path | None:
    """The first ancestor of ``path`` that others cannot traverse, if any."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & stat.S_IXOTH:
            return parent
    return None


class RootlessUser:
    def __init__(self, name: str):
        self.name = name
        self._fuse_mode: int | None = None
        self._created = False
        self.tmp = Path(tempfile.mkdtemp(prefix="als-rootless-"))
        os.chmod(self.tmp, 0o755)
        r = subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], capture_output=True,
                           text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"useradd {name}: {r.stderr}")
        self._created = True
        pw = pwd.getpwnam(name)
        self.uid, self.gid, self.home = pw.pw_uid, pw.pw_gid, Path(pw.pw_dir)
        for f in ("/etc/subuid", "/etc/subgid"):
            if not any(line.startswith(name + ":") for line in Path(f).read_text().splitlines()):
                raise RuntimeError(f"useradd gave {name} no range in {f}")
        self.runtime_dir = self.tmp / "run"
        self.runtime_dir.mkdir(mode=0o700)
        os.chown(self.runtime_dir, self.uid, self.gid)
        mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
        if mode & 0o006 != 0o006:
            self._fuse_mode = mode
            os.chmod("/dev/fuse", 0o666)
        self._prelude = self._reach_python()

    def _reach_python(self) -> str:
        prefix = Path(sys.prefix).resolve()
        hidden = _hidden_ancestor(prefix)
        if hidden is None:
            return ""
        keep = self.tmp / "prefix"
        keep.mkdir()
        rel = prefix.relative_to(hidden)
        q = shlex.quote
        return (f"mount --bind {q(str(prefix))} {q(str(keep))} && "
                f"mount -t tmpfs -o mode=0755,size=1m tmpfs {q(str(hidden))} && "
                f"mkdir -p {q(str(hidden / rel))} && mount --bind {q(str(keep))} {q(str(hidden / rel))} && ")

    def write(self, rel: str, text: str) -> Path:
        """Write a file under the user's home, owned by the user (parents too)."""
        path = self.home / rel
        parts = Path(rel).parts
        for i in range(1, len(parts)):
            d = self.home.joinpath(*parts[:i])
            d.mkdir(exist_ok=True)
            os.chown(d, self.uid, self.gid)
        path.write_text(text)
        os.chown(path, self.uid, self.gid)
        return path

    def command(self, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
        """argv that runs ``argv`` as the user (in the private mount namespace described above)."""
        base = {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
                "XDG_RUNTIME_DIR": str(self.runtime_dir), "PATH": "/usr/local/bin:/usr/bin:/bin",
                "PYTHONDONTWRITEBYTECODE": "1"}
        base.update(env or {})
        inner = ["runuser", "-u", self.name, "--", "env", "-i",
                 *[f"{k}={v}" for k, v in base.items()], *argv]
        script = self._prelude + "cd / && exec " + " ".join(shlex.quote(a) for a in inner)
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script]

    def run(self, argv: list[str], *, env=None, timeout: float = 180, check: bool = True):
        r = subprocess.run(self.command(argv, env), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} as {self.name} exited {r.returncode}\n"
                               f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}")
        return r

    def popen(self, argv: list[str], *, env=None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv, env), **kw)

    def pids(self) -> list[int]:
        """Processes running as the user (their real uid)."""
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/status") as f:
                        uid_line = next(l for l in f if l.startswith("Uid:"))
                except (OSError, StopIteration):
                    continue
                if int(uid_line.split()[1]) == self.uid:
                    out.append(int(name))
        return out

    def kill_all(self, timeout: float = 10) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout / 2
            while time.monotonic() < deadline and [p for p in self.pids() if not _zombie(p)]:
                time.sleep(0.1)

    def close(self) -> None:
        if self._created:
            self.kill_all()
            subprocess.run(["userdel", "--remove", self.name], capture_output=True, timeout=60)
            self._created = False
        if self._fuse_mode is not None:
            os.chmod("/dev/fuse", self._fuse_mode)
            self._fuse_mode = None
        subprocess.run(["rm", "-rf", str(self.tmp)], timeout=60)

    def __enter__(self) -> "RootlessUser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class UnshareStore:
    """`als serve` run by ``user`` inside `podman unshare`: in Podman's rootless user and mount namespaces.

    There the store's mount, and every overlay it mounts, is in the namespace
    where the user's Podman runs its containers, and the ids it reports are
    mapped as for Podman's own layers (0 -> the user, 1.. -> its subuids).
    """

    def __init__(self, user: RootlessUser, root: Path, mountpoint: Path, config: Path):
        self.user, self.root, self.mountpoint, self.config = user, root, mountpoint, config
        self.log_path = user.tmp / "als.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "UnshareStore":
        with open(self.log_path, "wb") as log:
            os.chmod(self.log_path, 0o644)
            self.proc = self.user.popen(["podman", "unshare", *self.als_argv(
                "serve", "--config", str(self.config), "--log-level", "debug", str(self.mountpoint))],
                env={"PYTHONPATH": str(REPO)}, stdout=log, stderr=log, stdin=None)
        deadline = time.monotonic() + timeout
        while "store mounted at" not in self.log():
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)
        return self

    def als_argv(self, command: str, *args: str) -> list[str]:
        """argv of `als COMMAND --root <the store's root> ARGS`, to run as the user."""
        return [os.path.realpath(sys.executable), "-m", "als", command, "--root", str(self.root), *args]

    def als(self, command: str, *args: str, unshare: bool = True, check: bool = True):
        """`als COMMAND` as the user, inside `podman unshare` unless ``unshare`` is false."""
        argv = self.als_argv(command, *args)
        return self.user.run(["podman", "unshare", *argv] if unshare else argv, env={"PYTHONPATH": str(REPO)},
                             check=check)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> list[int]:
        """The store itself, not the `podman unshare` that runs it."""
        found = []
        for pid in self.user.pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read()
                if b"\0-m\0als\0serve\0" in argv and not argv.startswith(b"podman\0"):
                    found.append(pid)
            except OSError:
                pass
        return found

    def pid(self) -> int:
        (pid,) = self.pids()
        return pid

    def stop(self) -> None:
        """SIGINT to the store itself (not to `podman unshare`): it stops for good, unmounts, then exits
        (SIGTERM would leave the mounts to a next store)."""
        if self.proc is None:
            return
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
