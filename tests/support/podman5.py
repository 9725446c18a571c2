"""Real Podman 5 (Debian trixie: 5.4, sid: 5.8) in a Debian chroot, for the Podman 5 tier.

The host is Debian 12 (Podman 4.3.1); Debian's archive also serves trixie and
sid. ``ensure_chroot(suite)`` builds ``debootstrap --variant=minbase`` of the
suite with Podman, runc and the Python packages `als` needs, from the mirror
this machine's apt already uses, once: it is kept under
/var/tmp/als-podman5/<suite>, built in a temp dir next to it and renamed when
complete (an interrupted build is never taken as done), under a lock so that
parallel runs build it once. A cached chroot whose package list differs is
rebuilt.

``Podman5`` is ``als.podman.Podman`` with every command run in that chroot,
inside a namespace of its own (``ChrootNamespace``):

* a private mount namespace whose root (``pivot_root``, so that ``/`` is a
  mount point, which runc needs, and user namespaces, which rootless Podman
  needs, may still be created: a chrooted process may not) is an overlay of
  the cached chroot with a per-instance upper dir: the cache is never written;
* ``/proc`` of its own PID namespace, the host's ``/sys`` and ``/dev``, tmpfs on ``/run`` and ``/tmp``;
* the work dir, the store's mount point and any other host path the caller
  names bind-mounted at the same path, so that every path in the config files
  Podman reads is the same inside and out;
* a PID namespace whose init (a reaper) is the namespace's anchor: ``close()``
  kills it, which kills every process in it (podman, conmon, containers) and
  so frees every mount made in it. Nothing is mounted in the host's namespace.

Commands enter the namespace with ``nsenter`` and get a clean environment.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from als.tools.podman import Podman, PodmanError

SUITES = {"trixie": "Podman 5.4", "sid": "Podman 5.8"}
CACHE_DIR = Path("/var/tmp/als-podman5")
# podman + runc (crun fails on this host's hybrid cgroups); python3 and what `als` imports, for
# `als auth-helper` (run by Podman) and `als serve` (rootless, inside `podman unshare`); uidmap
# for rootless Podman. (debootstrap does not resolve virtual packages: python3-cffi-backend
# provides what python3-zstandard depends on.)
PACKAGES = ("podman", "runc", "ca-certificates", "uidmap", "python3", "python3-requests",
            "python3-zstandard", "python3-cffi-backend", "python3-cachetools", "python3-prometheus-client")
STAMP = ".als-chroot.json"  # written last, inside the tree before the rename
BUILD_TIMEOUT = 900.0  # measured here: 60 s (trixie), 60-140 s (sid)
LOCK_TIMEOUT = BUILD_TIMEOUT + 120.0
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MIRROR_ENV = "ALS_DEBIAN_MIRROR"  # overrides the mirror read from apt's sources


# --------------------------------------------------------------------------
# The Debian mirror apt uses
# --------------------------------------------------------------------------

def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    stanza: dict[str, str] = {}
    key = None
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, None
        elif line[0] in " \t" and key:
            stanza[key] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            stanza[key] = value.strip()


def _one_line_entries(text: str) -> Iterator[dict[str, str]]:
    for line in text.splitlines():
        line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(line) >= 3 and line[0] == "deb":
            yield {"types": "deb", "uris": line[1], "suites": line[2]}


def host_codename(os_release: Path = Path("/etc/os-release")) -> str:
    for line in os_release.read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError(f"{os_release} names no VERSION_CODENAME")


def debian_mirror(apt_dir: Path = Path("/etc/apt"), codename: str | None = None) -> str:
    """The URI of the apt source that serves this host's own suite (``deb URI bookworm main``):
    the same Debian archive serves trixie and sid. ``$ALS_DEBIAN_MIRROR`` overrides it."""
    if os.environ.get(MIRROR_ENV):
        return os.environ[MIRROR_ENV]
    codename = codename or host_codename()
    entries: list[dict[str, str]] = []
    for f in [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*"))]:  # apt's order
        if f.suffix == ".sources":
            entries += [s for s in _deb822_stanzas(f.read_text(errors="replace"))
                        if s.get("enabled", "yes").lower() != "no"]
        elif f.name == "sources.list" or f.suffix == ".list":
            if f.is_file():
                entries += list(_one_line_entries(f.read_text(errors="replace")))
    for e in entries:
        if "deb" in e.get("types", "").split() and codename in e.get("suites", "").split():
            return e["uris"].split()[0]
    raise RuntimeError(f"no apt source in {apt_dir} serves {codename!r}; set ${MIRROR_ENV}")


# --------------------------------------------------------------------------
# The cached chroot
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Chroot:
    """A complete chroot of ``suite``: ``podman_version`` is its Debian package version."""
    path: Path
    suite: str
    podman_version: str
    build_seconds: float   # how long its debootstrap took
    built_now: bool        # built by this call (else found in the cache)

    @property
    def podman_release(self) -> tuple[int, int]:
        m = re.match(r"(?:\d+:)?(\d+)\.(\d+)", self.podman_version)
        if not m:
            raise ValueError(f"cannot read a Podman release from {self.podman_version!r}")
        return int(m.group(1)), int(m.group(2))


def _package_version(root: Path, package: str) -> str:
    status = (root / "var/lib/dpkg/status").read_text(errors="replace")
    for stanza in _deb822_stanzas(status):
        if stanza.get("package") == package and "installed" in stanza.get("status", ""):
            return stanza.get("version", "")
    raise RuntimeError(f"{package} is not installed in {root}")


def _key(packages: Sequence[str]) -> str:
    return "minbase:" + ",".join(sorted(packages))


def _load(path: Path, key: str, built_now: bool = False) -> Chroot | None:
    try:
        stamp = json.loads((path / STAMP).read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("key") != key or not (path / "usr/bin/podman").exists():
        return None
    return Chroot(path, stamp["suite"], stamp["podman"], stamp["build_seconds"], built_now)


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the test process dies, so nothing outlives a killed run."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _locked(lock_path: Path, timeout: float):
    """An exclusive flock on ``lock_path``, waited for at most ``timeout`` seconds."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise TimeoutError(f"{lock_path} still held after {timeout:.0f}s (another chroot build?)")
            time.sleep(1)


def debootstrap(suite: str, target: Path, packages: Sequence[str], mirror: str, timeout: float,
                log_path: Path) -> None:
    """``debootstrap --variant=minbase --include=PACKAGES SUITE TARGET MIRROR``, bounded by ``timeout``."""
    # In a private mount namespace: the /proc and /sys debootstrap mounts in the target vanish
    # with it, even if it is killed half way.
    argv = ["unshare", "--mount", "--propagation", "private", "--", "debootstrap", "--variant=minbase",
            f"--include={','.join(packages)}", suite, str(target), mirror]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
        try:
            rc = proc.wait(timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if rc != 0:
        detail = log_path.read_text(errors="replace")[-3000:]
        inner = target / "debootstrap/debootstrap.log"
        if inner.exists():
            detail += "\n--- debootstrap.log ---\n" + inner.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"debootstrap {suite} from {mirror} failed ({rc}):\n{detail}")


def ensure_chroot(suite: str, *, cache_dir: Path = CACHE_DIR, packages: Sequence[str] = PACKAGES,
                  mirror: str | None = None, build_timeout: float = BUILD_TIMEOUT,
                  lock_timeout: float = LOCK_TIMEOUT, build: Callable[..., None] = debootstrap) -> Chroot:
    """The chroot of ``suite`` from the cache, built first if missing or made with other packages.

    ``build(suite, target, packages, mirror, timeout, log_path)`` makes the tree (``debootstrap``)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / suite
    key = _key(packages)
    found = _load(final, key)
    if found is not None:
        return found
    fd = _locked(cache_dir / f".{suite}.lock", lock_timeout)
    try:
        found = _load(final, key)  # built by another run while we waited
        if found is not None:
            return found
        for stale in [*cache_dir.glob(f".build-{suite}-*"), *cache_dir.glob(f".old-{suite}-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted build (we hold the lock)
        tmp = cache_dir / f".build-{suite}-{os.getpid()}"
        t0 = time.monotonic()
        try:
            build(suite, tmp, packages, mirror or debian_mirror(), build_timeout, cache_dir / f".build-{suite}.log")
            shutil.rmtree(tmp / "var/cache/apt/archives", ignore_errors=True)  # the .debs: ~75 MB
            (tmp / "var/cache/apt/archives/partial").mkdir(parents=True)
            stamp = {"key": key, "suite": suite, "podman": _package_version(tmp, "podman"),
                     "build_seconds": round(time.monotonic() - t0, 1), "built": time.time()}
            (tmp / STAMP).write_text(json.dumps(stamp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if final.exists():
            old = cache_dir / f".old-{suite}-{os.getpid()}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        built = _load(final, key, built_now=True)
        assert built is not None
        return built
    finally:
        os.close(fd)  # releases the lock


# --------------------------------------------------------------------------
# A namespace rooted in the chroot
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Bind:
    """A host path bind-mounted at ``target`` inside (default: the same path), with the mounts
    under it (the store has a second mount on its ``.noxattr`` directory)."""
    source: Path
    target: str = ""
    read_only: bool = False

    @property
    def inside(self) -> str:
        return self.target or str(self.source)


# Run by `sh` as PID 1 of the new PID namespace, in the new mount namespace, still seeing the host's
# file system: build the root, pivot into it, become the reaper.
_SETUP = r"""
set -eu
lower=$1 upper=$2 work=$3 root=$4; shift 4
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=0755,size=256m tmpfs "$root/run"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
while [ $# -gt 0 ]; do
  src=$1 dst=$root$2 mode=$3; shift 3
  if [ -d "$src" ]; then mkdir -p "$dst"; else mkdir -p "$(dirname "$dst")"; [ -e "$dst" ] || : > "$dst"; fi
  mount --rbind "$src" "$dst"
  if [ "$mode" = ro ]; then mount -o remount,bind,ro "$dst"; fi
done
mkdir "$root/.host-root"
cd "$root"
pivot_root . .host-root
umount -l /.host-root
rmdir /.host-root
mount --make-rshared /  # what rootless Podman expects of /; shared only inside this namespace
echo ready
exec /usr/bin/python3 -c "$ALS_REAPER"
"""

# PID 1: reap orphans (conmon, `podman container cleanup`) until killed.
_REAPER = """
import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.5)
"""


class ChrootNamespace:
    """Mount + PID namespaces rooted in an overlay of ``chroot`` (see the module doc).

    ``scratch``: a directory of ours for the overlay's upper, work and mount dirs
    and the setup log; ``files`` (path inside -> text) are written to the upper
    dir before the overlay is mounted, as executables (mode 0755).
    """

    def __init__(self, chroot: Path, scratch: Path, binds: Sequence[Bind] = (),
                 files: Mapping[str, str] | None = None, start_timeout: float = 60.0):
        self.chroot = Path(chroot)
        self.scratch = Path(scratch)
        self.binds = list(binds)
        self.files = dict(files or {})
        self.start_timeout = start_timeout
        self.upper, self.work, self.root = (self.scratch / n for n in ("upper", "work", "root"))
        self.log_path = self.scratch / "namespace.log"
        self.proc: subprocess.Popen | None = None
        self.init_pid: int | None = None

    def start(self) -> "ChrootNamespace":
        for d in (self.upper, self.work, self.root):
            d.mkdir(parents=True, exist_ok=True)
        for inside, text in self.files.items():
            path = self.upper / inside.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o755)
        args = [str(self.chroot), str(self.upper), str(self.work), str(self.root)]
        for b in self.binds:
            args += [str(b.source), b.inside, "ro" if b.read_only else "rw"]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "ALS_REAPER": _REAPER}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--",
                 "sh", "-c", _SETUP, "als-podman5-ns", *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env,
                start_new_session=True, preexec_fn=_die_with_parent)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self.start_timeout
        line = b""
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                chunk = os.read(self.proc.stdout.fileno(), 64)
                if not chunk:
                    break
                line += chunk
        sel.close()
        if line.strip() != b"ready":
            raise RuntimeError(f"the Podman 5 namespace did not start ({line!r}): "
                               f"{self.log_path.read_text(errors='replace')[-2000:]}")
        self.init_pid = self._child_of(self.proc.pid)

    @staticmethod
    def _child_of(pid: int) -> int:
        children = _children().get(pid, [])
        if len(children) != 1:
            raise RuntimeError(f"cannot find the namespace's init under PID {pid}: {children}")
        return children[0]

    def command(self, argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
        """argv that runs ``argv`` inside, as root, with exactly ``env``."""
        if self.init_pid is None:
            raise RuntimeError("the Podman 5 namespace is not running")
        return ["nsenter", "--target", str(self.init_pid), "--mount", "--pid", "--",
                "/usr/bin/env", "-i", *[f"{k}={v}" for k, v in env.items()], *argv]

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` inside as root (``env``: default PATH and HOME); bounded by ``timeout``."""
        return run_bounded(self.command(argv, env or {"PATH": CHROOT_PATH, "HOME": "/root"}), argv,
                           "in the Podman 5 namespace", timeout, check)

    def pids(self) -> list[int]:
        """Host PIDs of every process started in the namespace: its init and all descendants
        (containers run in PID namespaces of their own below it)."""
        return process_tree(self.init_pid) if self.init_pid is not None else []

    def stop(self, timeout: float = 20.0) -> None:
        """Kill the namespace's init (and with it every process inside), wait for it; idempotent."""
        if self.init_pid is not None:
            try:
                os.kill(self.init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.kill()  # --kill-child: init gets SIGKILL too, should the line above have missed
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None
        if self.init_pid is not None:
            deadline = time.monotonic() + timeout
            while process_tree(self.init_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.init_pid = None

    def __enter__(self) -> "ChrootNamespace":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_bounded(command: Sequence[str], argv: Sequence[str], where: str, timeout: float,
                check: bool) -> subprocess.CompletedProcess:
    """Run ``command`` (which runs ``argv`` ``where``), killing its process group after ``timeout``;
    PodmanError (with both outputs) on a non-zero status when ``check``."""
    proc = subprocess.Popen(command, text=True, start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise PodmanError(f"{' '.join(argv)} timed out after {timeout}s {where}\n"
                          f"stdout: {out[-3000:]}\nstderr: {err[-3000:]}") from None
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    res = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
    if check and res.returncode != 0:
        raise PodmanError(f"{' '.join(argv)} exited {res.returncode} {where}\n"
                          f"stdout: {out[-3000:]}\nstderr: {err[-3000:]}", res)
    return res


def _children() -> dict[int, list[int]]:
    """PID -> PIDs of its live (not zombie) children, from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(name))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and every live process descending from it (host PIDs); [] once ``root`` is gone."""
    try:
        if Path(f"/proc/{root}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return []
    except OSError:
        return []
    children = _children()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


# --------------------------------------------------------------------------
# Podman 5
# --------------------------------------------------------------------------

class Podman5(Podman):
    """``als.podman.Podman`` whose commands run Podman 5 from ``chroot`` (rootful).

    Same configuration as the host's isolated Podman (runc, ulimits, no network,
    cgroupfs, file events), written under ``workdir`` and bind-mounted at the same
    path. ``auth_helper``: a program path inside, named in registries.conf as
    ``additional-layer-store-auth-helper``. ``binds``: more host paths to see inside
    (e.g. the store's root, for its control socket); ``files``: executables to add
    (path inside -> text). Other keyword arguments go to ``Podman``.
    """

    def __init__(self, chroot: Chroot, workdir: str | os.PathLike, *, auth_helper: str | None = None,
                 binds: Sequence[Bind] = (), files: Mapping[str, str] | None = None, **kw):
        self.chroot = chroot
        super().__init__(workdir, podman_bin="/usr/bin/podman", **kw)
        if auth_helper is not None:
            text = self.registries_conf.read_text()
            self.registries_conf.write_text(
                f"additional-layer-store-auth-helper = {json.dumps(auth_helper)}\n{text}")
        mine = [Bind(self.workdir)]
        if not str(self.runroot).startswith(str(self.workdir) + "/"):
            mine.append(Bind(self.runroot.parent))  # the short runroot under /tmp
        if self.additional_layer_store is not None:
            mine.append(Bind(Path(self.additional_layer_store)))
        for conf in (self.registries_conf, self.auth_file):
            if not str(conf).startswith(str(self.workdir) + "/"):
                mine.append(Bind(conf, read_only=True))
        self.namespace = ChrootNamespace(chroot.path, self.workdir / "namespace", [*mine, *binds], files)
        try:
            self.namespace.start()
        except BaseException:
            self.close()
            raise

    @property
    def env(self) -> dict[str, str]:
        """Exactly what podman gets inside (nothing of the test process's environment)."""
        return {"PATH": CHROOT_PATH, "HOME": "/root",
                "PODMAN_IGNORE_CGROUPSV1_WARNING": "1",  # this host mounts cgroups v1
                **self.own_env}

    def command(self, *args: str) -> list[str]:
        if self.namespace.init_pid is None:  # e.g. close() after a failed start
            raise PodmanError(f"podman {' '.join(map(str, args))}: the Podman 5 namespace is not running")
        return self.namespace.command([self.podman_bin, *map(str, args)], self.env)

    def stop_environment(self) -> None:
        self.namespace.stop()
        shutil.rmtree(self.namespace.scratch, ignore_errors=True)

    def version(self) -> str:
        return self.run("version", "--format", "{{.Client.Version}}").stdout.strip()


def userns_blocked() -> str | None:
    """Why an unprivileged user cannot create user namespaces on this kernel, if it cannot."""
    for knob, bad in (("/proc/sys/user/max_user_namespaces", "0"),
                      ("/proc/sys/kernel/unprivileged_userns_clone", "0")):
        try:
            if Path(knob).read_text().strip() == bad:
                return f"{knob} is {bad}"
        except OSError:
            pass
    return None


class RootlessUser5:
    """An unprivileged user of the chroot, with subuid/subgid ranges, for rootless Podman 5.

    The user exists only in the namespace's overlay (``useradd`` there); its home
    is a host directory bind-mounted at /home/<name> (rootless Podman's overlay
    storage cannot sit on the namespace's overlay root), and /dev/fuse is a
    device node of our own with mode 0666 (this host's is 0600; Debian's udev
    rule makes it 0666), so the host's /dev is never changed. ``close()`` kills
    the namespace, and with it every process of the user: Podman's pause process,
    a store started in ``podman unshare``, containers.
    """

    # ``workdir``: a directory for the home, the device node and the namespace; ``close()`` deletes it.
    def __init__(self, chroot: Chroot, workdir: str | os.PathLike, name: str = "alsuser",
                 binds: Sequence[Bind] = ()):
        self.workdir = Path(workdir)
        self.name = name
        self.uid = self._free_uid(chroot.path)
        self.home = Path("/home") / name                 # inside
        self.host_home = self.workdir / "home"           # outside
        self.runtime_dir = f"/run/user/{self.uid}"
        self.host_home.mkdir(parents=True)
        os.chown(self.host_home, self.uid, self.uid)
        fuse = self.workdir / "fuse"
        os.mknod(fuse, 0o666 | stat.S_IFCHR, os.makedev(10, 229))  # /dev/fuse: misc 10, minor 229
        os.chmod(fuse, 0o666)
        self.namespace = ChrootNamespace(chroot.path, self.workdir / "namespace",
                                         [Bind(self.host_home, str(self.home)), Bind(fuse, "/dev/fuse"), *binds])
        self.namespace.start()
        try:
            self.namespace.run(["sh", "-c", 'touch /etc/subuid /etc/subgid && '
                                f'useradd --uid {self.uid} --home-dir {self.home} --shell /bin/sh {name} && '
                                f'mkdir -p {self.runtime_dir} && chown {name}: {self.runtime_dir} && '
                                f'chmod 0700 {self.runtime_dir} && grep -q "^{name}:" /etc/subuid'])
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _free_uid(root: Path) -> int:
        """A uid that neither the host nor the chroot gives anyone (so no process of ours is confused
        with someone else's)."""
        taken = set()
        for passwd in (Path("/etc/passwd"), root / "etc/passwd"):
            taken |= {int(line.split(":")[2]) for line in passwd.read_text().splitlines() if line.count(":") >= 3}
        return next(u for u in range(23000, 60000) if u not in taken)

    @property
    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name, "PATH": CHROOT_PATH,
                "XDG_RUNTIME_DIR": self.runtime_dir, "PODMAN_IGNORE_CGROUPSV1_WARNING": "1"}

    def write(self, rel: str, text: str) -> str:
        """Write ``rel`` under the user's home, owned by the user (parents too); returns the path inside."""
        path = self.host_home / rel
        for parent in reversed(path.relative_to(self.host_home).parents[:-1]):
            d = self.host_home / parent
            d.mkdir(exist_ok=True)
            os.chown(d, self.uid, self.uid)
        path.write_text(text)
        os.chown(path, self.uid, self.uid)
        return str(self.home / rel)

    def command(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
        inner = ["runuser", "-u", self.name, "--", "env", "-i",
                 *[f"{k}={v}" for k, v in {**self.env, **(env or {})}.items()], *argv]
        return self.namespace.command(inner, {"PATH": CHROOT_PATH})

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 180,
            check: bool = True) -> subprocess.CompletedProcess:
        """``argv`` as the user; bounded by ``timeout``; raises PodmanError on failure when ``check``."""
        return run_bounded(self.command(argv, env), argv, f"as {self.name}", timeout, check)

    def popen(self, argv: Sequence[str], env: Mapping[str, str] | None = None, **kw) -> subprocess.Popen:
        kw.setdefault("start_new_session", True)
        return subprocess.Popen(self.command(argv, env), **kw)

    def close(self) -> None:
        self.namespace.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "RootlessUser5":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.support.podman5 [SUITE...]``: build (or find) the chroots, say how long it took."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m tests.support.podman5", description=main.__doc__)
    parser.add_argument("suites", nargs="*", metavar="SUITE", help=f"default: {' '.join(SUITES)}")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    args = parser.parse_args(argv)
    unknown = set(args.suites) - set(SUITES)
    if unknown:
        parser.error(f"unknown suite {', '.join(sorted(unknown))} (known: {', '.join(SUITES)})")
    for suite in args.suites or SUITES:
        t0 = time.monotonic()
        c = ensure_chroot(suite, cache_dir=args.cache_dir)
        how = f"built in {c.build_seconds:.0f}s" if c.built_now else f"cached (built in {c.build_seconds:.0f}s)"
        print(f"{suite}: podman {c.podman_version} at {c.path}: {how}; {time.monotonic() - t0:.1f}s now")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
