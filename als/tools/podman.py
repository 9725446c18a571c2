"""An isolated Podman (4.3.1, rootful): `als optimize` runs workloads with it; tests, demo and bench too.

Every ``podman`` command runs with its own storage.conf / containers.conf /
registries.conf / auth.json (graphroot, runroot, tmp dir, file locks and network
config all under a work directory; the runroot moves to a short /tmp/alsp-*
directory when the work dir's path is long, see MAX_RUNROOT_LEN) and inside ``unshare --mount --propagation
private`` with ``/var/lib/containers/cache`` (Podman's blob-info cache, which
ignores the configured graphroot), ``/run/runc`` (runc's state) and
``/run/containers/networks`` (netavark's rootful run dir) bind-mounted from
directories of our own, so the host's Podman state is never touched.

By default each command also gets its own PID namespace (``--pid --fork
--mount-proc``): conmon and ``podman container cleanup`` die and are reaped with
the command, so nothing outlives it (without it, each conmon ends as a zombie
child of PID 1, which on this machine reaps orphans only after a long while).
``pid_namespace=False`` is needed for ``run -d`` (the container would die with
the command otherwise).

Because each command runs in a private mount namespace, the overlay mounts
Podman makes for containers exist only in that namespace and vanish with it: no
mount can leak into the host's namespace. Detached containers (``run -d``, only
with ``pid_namespace=False``) keep their namespace alive through conmon;
``close()`` removes them and kills any process still naming our work dir.

    with RegistryProcess() as reg, Podman(tmp, insecure_registries=[reg.host]) as p:
        p.import_tar(rootfs, f"{reg.host}/py:1")
        p.push(f"{reg.host}/py:1")

``registries_conf`` / ``auth_file`` make it use the user's own files instead
of written ones (what `als optimize` does, so private and insecure registries
work as they do for the user's Podman).

docs/testing.md says why each setting is needed here (runc, ulimits, netns none, ALS mount).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

PODMAN_BIN = "podman"

# Paths Podman 4.3.1 / runc / netavark use as root whatever the configuration
# says; each gets a directory of ours bind-mounted over it (our sub-dir name).
HOST_STATE_PATHS = {
    "/var/lib/containers/cache": "blobinfo",     # c/image blob-info cache
    "/run/runc": "runc",                         # runc container state
    "/run/containers/networks": "netavark-run",  # netavark run dir (rootful: fixed)
}

# A runroot path longer than ~50 bytes makes every `podman run` stall 20 s here
# ("Exceeded conmon timeout waiting for container to exit"; measured: 50 works,
# 52 stalls), e.g. under pytest's tmp_path. Longer ones are replaced.
MAX_RUNROOT_LEN = 40

# Inside the private mount namespace: bind "SRC TARGET" pairs, then exec the
# remaining arguments (podman ...).
_WRAPPER = r"""
set -e
n="$1"; shift
while [ "$n" -gt 0 ]; do mount --bind "$1" "$2"; shift 2; n=$((n - 1)); done
exec "$@"
"""


class PodmanError(RuntimeError):
    """A podman command failed (exit status != 0) or timed out."""

    def __init__(self, message: str, result: subprocess.CompletedProcess | None = None):
        super().__init__(message)
        self.result = result


def _toml_str(s: str) -> str:
    return json.dumps(str(s))  # a JSON string is a valid TOML basic string


def _toml_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(_toml_str(i) for i in items) + "]"


def _check_mountpoint(path: str) -> None:
    """Raise if the ALS mount point is missing or its FUSE daemon is dead."""
    try:
        st = os.stat(path)
    except OSError as e:  # ENOTCONN: "Transport endpoint is not connected"
        raise FileNotFoundError(
            f"additional layer store {path!r} is not usable ({e}); Podman would fail on "
            f"every storage operation (clear a dead mount with `fusermount -u -z {path}`)") from e
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"additional layer store {path!r} is not a directory")


def _tail(text: str | bytes | None, limit: int = 4000) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text if len(text) <= limit else "…" + text[-limit:]


class Podman:
    """A rootful Podman whose whole state lives under ``workdir``.

    ``workdir``: a directory for our files (created if missing); ``None`` makes a
    temp dir that ``close()`` deletes. When a directory is given, ``close()``
    deletes only the sub-directories this object created (``keep=True``: none).

    ``additional_layer_store``: a mount point, written to storage.conf as
    ``additionallayerstores = ["<path>:ref"]``; checked to exist before every
    command. ``insecure_registries``: ``host:port`` entries marked ``insecure =
    true``. ``partial_pulls``: ``enable_partial_images = "true"`` (Podman then
    consumes eStargz / zstd:chunked itself). ``env_extra``: added to the
    environment of every podman command. ``storage_options``: more
    ``[storage.options]`` string keys. ``pid_namespace``: see the module doc.

    Attributes: ``graphroot``, ``runroot``, ``storage_conf``, ``containers_conf``,
    ``registries_conf``, ``auth_file``, ``env`` (the environment of podman).
    """

    def __init__(self, workdir: str | os.PathLike | None = None, *,
                 additional_layer_store: str | os.PathLike | None = None,
                 insecure_registries: Sequence[str] = (),
                 partial_pulls: bool = False,
                 env_extra: Mapping[str, str] | None = None,
                 storage_options: Mapping[str, str] | None = None,
                 pid_namespace: bool = True,
                 keep: bool = False,
                 podman_bin: str = PODMAN_BIN,
                 registries_conf: str | os.PathLike | None = None,
                 auth_file: str | os.PathLike | None = None):
        if additional_layer_store is not None:
            _check_mountpoint(str(additional_layer_store))  # before creating anything
        if workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="als-podman-"))
            self._own_workdir = True
        else:
            self.workdir = Path(workdir).absolute()
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._own_workdir = False
        self.additional_layer_store = (str(Path(additional_layer_store).absolute())
                                       if additional_layer_store is not None else None)
        self.insecure_registries = list(insecure_registries)
        self.partial_pulls = partial_pulls
        self.env_extra = dict(env_extra or {})
        self.storage_options = dict(storage_options or {})
        self.pid_namespace = pid_namespace
        self.keep = keep
        self.podman_bin = shutil.which(podman_bin) or podman_bin
        self._closed = False

        w = self.workdir
        self.conf_dir = w / "conf"
        self.graphroot = w / "storage"
        self._short_dir: Path | None = None
        self.runroot = w / "run"
        if len(str(self.runroot)) > MAX_RUNROOT_LEN:
            self._short_dir = Path(tempfile.mkdtemp(prefix="alsp-", dir="/tmp"))
            self.runroot = self._short_dir / "run"
        self.tmp_dir = w / "tmp"            # libpod tmp_dir (state, events, file locks)
        self.image_tmp_dir = w / "imgtmp"   # TMPDIR / image_copy_tmp_dir (big temp files)
        self.network_dir = w / "networks"
        self.binds = {target: w / sub for target, sub in HOST_STATE_PATHS.items()}
        self._created = [self.conf_dir, self.graphroot, self.runroot, self.tmp_dir,
                         self.image_tmp_dir, self.network_dir, *self.binds.values()]
        for d in self._created:
            d.mkdir(parents=True, exist_ok=True)
        # Bind-mount targets must exist on the host (they stay as empty directories).
        for target in self.binds:
            os.makedirs(target, exist_ok=True)

        self.storage_conf = self.conf_dir / "storage.conf"
        self.containers_conf = self.conf_dir / "containers.conf"
        self._own_registries_conf = registries_conf is None
        self._own_auth_file = auth_file is None
        self.registries_conf = self.conf_dir / "registries.conf" if registries_conf is None else Path(registries_conf)
        self.auth_file = self.conf_dir / "auth.json" if auth_file is None else Path(auth_file)
        self._write_configs()

    # ------------------------------------------------------------------ config
    def _write_configs(self) -> None:
        s = ["[storage]",
             'driver = "overlay"',
             f"graphroot = {_toml_str(self.graphroot)}",
             f"runroot = {_toml_str(self.runroot)}",
             "",
             "[storage.options]"]
        if self.additional_layer_store is not None:
            s.append(f"additionallayerstores = {_toml_list([self.additional_layer_store + ':ref'])}")
        for k, v in self.storage_options.items():
            s.append(f"{k} = {_toml_str(v)}")
        s += ["", "[storage.options.pull_options]",
              f'enable_partial_images = "{"true" if self.partial_pulls else "false"}"',
              'use_hard_links = "false"', ""]
        self.storage_conf.write_text("\n".join(s))

        c = ["[containers]",
             'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]',
             'netns = "none"',
             'log_driver = "k8s-file"',
             "",
             "[network]",
             'network_backend = "netavark"',
             f"network_config_dir = {_toml_str(self.network_dir)}",
             "",
             "[engine]",
             'runtime = "runc"',
             'cgroup_manager = "cgroupfs"',
             'events_logger = "file"',
             f"events_logfile_path = {_toml_str(self.tmp_dir / 'events.log')}",
             f"tmp_dir = {_toml_str(self.tmp_dir)}",
             f"image_copy_tmp_dir = {_toml_str(self.image_tmp_dir)}",
             # file locks under tmp_dir instead of the host-wide /dev/shm/libpod_lock
             'lock_type = "file"',
             f"static_dir = {_toml_str(self.graphroot / 'libpod')}",
             f"volume_path = {_toml_str(self.graphroot / 'volumes')}",
             ""]
        self.containers_conf.write_text("\n".join(c))

        if self._own_registries_conf:
            r = ["unqualified-search-registries = []", 'short-name-mode = "permissive"', ""]
            for host in self.insecure_registries:
                r += ["[[registry]]", f"location = {_toml_str(host)}", "insecure = true", ""]
            self.registries_conf.write_text("\n".join(r))
        if self._own_auth_file:
            self.auth_file.write_text("{}\n")

    @property
    def env(self) -> dict[str, str]:
        """The environment every podman command gets."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("CONTAINERS_") and k not in ("REGISTRY_AUTH_FILE", "TMPDIR")}
        env.update(self.own_env)
        return env

    @property
    def own_env(self) -> dict[str, str]:
        """The variables that point podman at our files (and ``env_extra``)."""
        return {
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
            "CONTAINERS_CONF": str(self.containers_conf),
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            "REGISTRY_AUTH_FILE": str(self.auth_file),
            "TMPDIR": str(self.image_tmp_dir),
            **self.env_extra,
        }

    def command(self, *args: str) -> list[str]:
        """The full argv (unshare wrapper + podman) for ``podman ARGS``; for Popen users."""
        ns = ["--pid", "--fork", "--kill-child", "--mount-proc"] if self.pid_namespace else []
        return ["unshare", "--mount", "--propagation", "private", *ns, "--",
                "sh", "-c", _WRAPPER, "podman-ns", str(len(self.binds)),
                *[p for target, src in self.binds.items() for p in (str(src), target)],
                self.podman_bin, *map(str, args)]

    # --------------------------------------------------------------- commands
    def run(self, *args: str, check: bool = True, timeout: float | None = 300,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``podman ARGS``; text stdout/stderr captured.

        ``check``: raise PodmanError (with both outputs) on a non-zero status.
        On timeout the command's process group is killed and PodmanError raised.
        """
        if self._closed:
            raise PodmanError("Podman instance is closed")
        if self.additional_layer_store is not None:
            _check_mountpoint(self.additional_layer_store)
        argv = self.command(*args)
        proc = subprocess.Popen(argv, env=self.env, text=True, start_new_session=True,
                                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_group(proc)
            out, err = proc.communicate()
            raise PodmanError(f"podman {' '.join(map(str, args))} timed out after {timeout}s\n"
                              f"stdout: {_tail(out)}\nstderr: {_tail(err)}")
        except BaseException:
            self._kill_group(proc)
            proc.wait()
            raise
        res = subprocess.CompletedProcess(["podman", *map(str, args)], proc.returncode, out, err)
        if check and res.returncode != 0:
            raise PodmanError(f"podman {' '.join(map(str, args))} exited with {res.returncode}\n"
                              f"stdout: {_tail(out)}\nstderr: {_tail(err)}", res)
        return res

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # our child leads its own session
        except (ProcessLookupError, PermissionError):
            pass

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        """Start ``podman ARGS`` without waiting (caller waits; env preset)."""
        kwargs.setdefault("env", self.env)
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(self.command(*args), **kwargs)

    # Conveniences: thin, but they name the flags that matter here.
    def pull(self, ref: str, *extra: str, timeout: float | None = 300) -> str:
        """Pull ``ref`` (``--quiet``); returns the image ID."""
        out = self.run("pull", "--quiet", *extra, ref, timeout=timeout).stdout.split()
        return out[-1] if out else ""

    def push(self, ref: str, dest: str | None = None, *extra: str,
             tls_verify: bool = False, timeout: float | None = 300) -> None:
        """Push ``ref`` (to ``docker://dest`` when given); plain HTTP by default."""
        args = ["push", f"--tls-verify={'true' if tls_verify else 'false'}", *extra, ref]
        if dest is not None:
            args.append(dest if "://" in dest else f"docker://{dest}")
        self.run(*args, timeout=timeout)

    def import_tar(self, tar_path: str | os.PathLike, ref: str, *extra: str) -> str:
        """``podman import`` an uncompressed rootfs tar as a one-layer image; returns its ID."""
        out = self.run("import", "--quiet", *extra, str(tar_path), ref).stdout.split()
        return out[-1] if out else ""

    def load(self, archive: str | os.PathLike) -> list[str]:
        """``podman load -i`` a docker-archive / oci-archive; returns the loaded names."""
        out = self.run("load", "-i", str(archive)).stdout
        names = []
        for line in out.splitlines():
            if line.startswith("Loaded image"):
                names += [n.strip() for n in line.split(":", 1)[1].split(",") if n.strip()]
        return names

    def rmi(self, *refs: str, force: bool = True) -> None:
        self.run("rmi", *(["--force"] if force else []), *refs)

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "exists", ref, check=False).returncode == 0

    def inspect_image(self, ref: str) -> dict:
        return json.loads(self.run("image", "inspect", ref).stdout)[0]

    def run_container(self, image: str, *cmd: str, extra: Sequence[str] = (),
                      timeout: float | None = 300) -> str:
        """``podman run --rm [extra] IMAGE CMD``; returns stdout."""
        return self.run("run", "--rm", *extra, image, *cmd, timeout=timeout).stdout

    # ---------------------------------------------------------------- cleanup
    def close(self, timeout: float = 120) -> None:
        """Remove containers and images, kill leftover processes, delete our dirs.

        Bounded in time: each podman step gets a share of ``timeout`` and is
        killed when it overruns. Safe to call twice and after failures.
        """
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        usable = True
        if self.additional_layer_store is not None:
            try:
                _check_mountpoint(self.additional_layer_store)
            except OSError:
                usable = False  # podman would fail on every command anyway
        if usable:
            for args in (("rm", "--all", "--force", "--time", "0"), ("system", "reset", "--force")):
                left = deadline - time.monotonic()
                if left <= 1:
                    break
                try:
                    self.run(*args, check=False, timeout=min(left, 60))
                except PodmanError:
                    pass
        self._closed = True
        self.stop_environment()
        self._kill_leftovers()
        self._unmount_leftovers()
        if not self.keep:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            else:
                for d in self._created:
                    shutil.rmtree(d, ignore_errors=True)
            if self._short_dir is not None:
                shutil.rmtree(self._short_dir, ignore_errors=True)

    def stop_environment(self) -> None:
        """Called by ``close()`` once the last podman command ran, before leftover processes
        are killed and the work dir deleted: a subclass that runs podman somewhere else
        (another root file system, a namespace of its own) takes that down here."""

    def leftover_pids(self) -> list[int]:
        """PIDs (other than ours) of processes this instance started through podman
        and that still run: their command line names our graphroot, runroot or tmp
        dir (conmon, ``podman container cleanup``) or their environment has our
        CONTAINERS_CONF (podman itself). Never another program that merely has
        a path under the work dir in its arguments."""
        markers = [str(self.graphroot).encode() + b"/", str(self.runroot).encode() + b"/",
                   str(self.tmp_dir).encode() + b"/",
                   b"CONTAINERS_CONF=" + str(self.containers_conf).encode() + b"\0"]
        pids = []
        me = os.getpid()
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == me:
                continue
            for what in ("cmdline", "environ"):
                try:
                    with open(f"/proc/{name}/{what}", "rb") as f:
                        data = f.read()
                        if any(m in data for m in markers):
                            pids.append(int(name))
                            break
                except OSError:
                    break
        return pids

    def _kill_leftovers(self) -> None:
        pids = self.leftover_pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + 3
            while time.monotonic() < end:
                pids = [p for p in pids if os.path.exists(f"/proc/{p}") and not _is_zombie(p)]
                if not pids:
                    return
                time.sleep(0.05)

    def leftover_mounts(self) -> list[str]:
        """Mount points in the host's mount namespace under our work dir or runroot."""
        roots = [str(self.workdir) + "/", str(self.runroot)]
        out = []
        with open("/proc/mounts") as f:
            for line in f:
                mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[1])
                if any(mnt.startswith(r) for r in roots):
                    out.append(mnt)
        return out

    def _unmount_leftovers(self) -> None:
        for mnt in reversed(self.leftover_mounts()):
            subprocess.run(["umount", "-l", mnt], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30)

    def __enter__(self) -> "Podman":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Podman({str(self.workdir)!r}, als={self.additional_layer_store!r})"


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
