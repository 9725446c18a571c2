"""`als serve` as a real process with a real FUSE mount, for tests, demo and bench."""

from __future__ import annotations

import base64
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def is_mounted(path: Path) -> bool:
    path = Path(path).absolute()
    target = str(path.parent.resolve() / path.name)  # never a stat of the mount: it may wait for a successor
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def is_serving(path: Path) -> bool:
    """Mounted and answering: a dead mount left by a crash fails statfs with ENOTCONN (the kernel
    may still answer stat and listings from its caches)."""
    if not is_mounted(path):
        return False
    try:
        os.statvfs(path)
    except OSError:
        return False
    return True


def force_unmount(path: Path) -> None:
    """Lazily unmount ``path``: umount2(2) first, which never asks the mount itself anything (a
    connection kept for a successor that nobody serves would make a stat wait)."""
    if is_mounted(path):
        ctypes.CDLL(None, use_errno=True).umount2(os.fsencode(str(Path(path).absolute())), 2)  # MNT_DETACH
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(cmd, capture_output=True, timeout=30)


def write_registries_conf(path: Path, insecure_hosts: list[str]) -> Path:
    path.write_text("".join(f'[[registry]]\nlocation = "{h}"\ninsecure = true\n\n' for h in insecure_hosts))
    return path


class StoreProcess:
    """Runs ``python -m als serve`` on ``mountpoint``; ``stop()`` ends it and clears the mount."""

    def __init__(self, workdir: Path, *, registries_conf: Path | None = None, config: str = "",
                 log_level: str = "debug", env: dict | None = None, args: tuple[str, ...] = (),
                 wrapper: tuple[str, ...] = (), repo: Path | None = None):
        self.workdir = Path(workdir)
        self.repo = Path(repo) if repo else REPO  # the checkout whose `als` runs (make bench compares two)
        self.mountpoint = self.workdir / "store"
        self.root = self.workdir / "root"
        self.log_path = self.workdir / "als.log"
        self.config_path = self.workdir / "config.toml"
        self.config_path.write_text(config)
        self.registries_conf = registries_conf
        self.log_level = log_level
        self.env = env or {}
        self.args = tuple(args)  # more `als serve` options, e.g. ("--log-format", "json")
        self.wrapper = tuple(wrapper)  # a command that execs the rest, e.g. setpriv with its options
        self.pass_fds: tuple[int, ...] = ()  # descriptors the store inherits (with a wrapper placing them)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "StoreProcess":
        env = dict(os.environ, PYTHONPATH=str(self.repo), **self.env)
        if self.registries_conf:
            env["CONTAINERS_REGISTRIES_CONF"] = str(self.registries_conf)
        log = open(self.log_path, "ab")
        logged_before = log.tell()  # a restart appends: only this run's lines count
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "als", "serve", "--root", str(self.root),
             "--config", str(self.config_path), "--log-level", self.log_level, *self.args, str(self.mountpoint)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, cwd=self.repo, pass_fds=self.pass_fds)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"als serve exited {self.proc.returncode}: {self.log()[-3000:]}")
            if is_serving(self.mountpoint) and b"and answering" in self.log_path.read_bytes()[logged_before:]:
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"als serve did not mount in {timeout}s: {self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> int | None:
        """Stop for good (SIGINT: unmounts, and no holder is left waiting for a next store)."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout)
            rc = self.proc.returncode
            self.proc = None
        force_unmount(self.mountpoint)  # lazily: the .noxattr mount on it goes with it
        return rc

    def hand_over(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, leaving the mounts (their connections kept) to the next start: a planned restart."""
        rc = None
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            rc = self.proc.wait(timeout)
            self.proc = None
        return rc

    def kill(self) -> None:
        """SIGKILL, leaving the dead mount behind as a crash would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def layer_dir(self, ref: str, digest: str) -> Path:
        return self.mountpoint / base64.b64encode(ref.encode()).decode() / digest

    def __enter__(self) -> "StoreProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_log(store: StoreProcess, text: str, timeout: float = 10.0) -> None:
    """Until ``text`` is in the store's log (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in store.log():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the store log after {timeout}s: {store.log()[-2000:]}")
