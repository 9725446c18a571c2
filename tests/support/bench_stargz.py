"""The reference store for `make bench`: stargz-store, containerd/stargz-snapshotter's additional layer store.

It is only ever a program built on this machine to compare against; nothing of
it is part of this repository. Debian packages no stargz-store (its
``stargz-snapshotter`` package holds only ``ctr-remote``, and
``golang-github-containerd-stargz-snapshotter-dev`` only ``cmd/ctr-remote``),
so `make bench` looks for it, in this order, and runs without the reference
column, saying why, when there is none:

1. ``--stargz-store PATH`` (or ``STARGZ_STORE=PATH``): a binary of your own;
2. ``CACHE/stargz-store/stargz-store``: one built earlier;
3. ``stargz-store`` on PATH;
4. built here, offline, with Debian's Go (GOPATH mode over /usr/share/gocode),
   from a source tree holding ``cmd/stargz-store``: at
   ``CACHE/stargz-store/gopath/src/github.com/containerd/stargz-snapshotter``
   (a checkout of the release you want), or in Debian's -dev package should a
   later one ship it. Go packages Debian lacks go beside it under
   ``CACHE/stargz-store/gopath/src/<import path>``; a failed build names them.

It runs with its own defaults: an empty configuration file (a registry on
localhost is reached over plain HTTP without any), ``--root`` in the sample's
work directory, its own log level.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.support.store_process import force_unmount, is_serving

IMPORT_PATH = "github.com/containerd/stargz-snapshotter"
DEBIAN_GOCODE = Path("/usr/share/gocode")
BUILD_TIMEOUT = 1800.0


def obtain(cache: Path, explicit: str | None) -> tuple[Path | None, str]:
    """The stargz-store binary to compare against, and how it was found (or why there is none)."""
    home = cache / "stargz-store"
    binary = home / "stargz-store"
    if explicit:
        path = Path(explicit)
        if os.access(path, os.X_OK) and path.is_file():
            return path, f"given: {path}"
        return None, f"--stargz-store {path} is not an executable file"
    if os.access(binary, os.X_OK):
        return binary, f"built earlier into {binary}"
    on_path = shutil.which("stargz-store")
    if on_path:
        return Path(on_path), f"on PATH: {on_path}"
    sources = [home / "gopath" / "src" / IMPORT_PATH, DEBIAN_GOCODE / "src" / IMPORT_PATH]
    source = next((s for s in sources if (s / "cmd" / "stargz-store" / "main.go").exists()), None)
    if source is None:
        return None, ("no stargz-store binary, and no source tree with cmd/stargz-store: Debian's "
                      "golang-github-containerd-stargz-snapshotter-dev ships only cmd/ctr-remote; put a "
                      f"stargz-snapshotter checkout at {sources[0]} (README: Performance) or pass --stargz-store")
    return build(source, home, binary)


def build(source: Path, home: Path, binary: Path) -> tuple[Path | None, str]:
    go = shutil.which("go")
    if go is None:
        return None, "no Go toolchain to build stargz-store (apt-get install golang-go)"
    print(f"building stargz-store from {source} (once; a few minutes) ...", flush=True)
    env = dict(os.environ, GO111MODULE="off", GOFLAGS="", GOPROXY="off",
               GOPATH=f"{home / 'gopath'}:{DEBIAN_GOCODE}", GOCACHE=str(home / "gocache"))
    tmp = binary.with_suffix(".tmp")
    try:
        done = subprocess.run([go, "build", "-o", str(tmp), "./cmd/stargz-store"], cwd=source, env=env,
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None, f"building stargz-store took over {BUILD_TIMEOUT:.0f}s"
    if done.returncode != 0:
        missing = sorted(set(re.findall(r'cannot find package "([^"]+)"', done.stderr)))
        if missing:
            return None, (f"building stargz-store from {source} failed: Go packages missing from Debian "
                          f"and from {home / 'gopath' / 'src'}: {', '.join(missing)}")
        return None, f"building stargz-store from {source} failed: {done.stderr.strip()[-600:]}"
    tmp.replace(binary)
    return binary, f"built from {source} into {binary}"


def describe(binary: Path) -> dict:
    """What the JSON records of the binary, so that two results can be told apart."""
    return {"path": str(binary), "sha256": hashlib.sha256(binary.read_bytes()).hexdigest()}


class StargzStore:
    """``stargz-store --root ROOT --config EMPTY MOUNTPOINT``; ``stop()`` ends it by PID and clears the mount."""

    def __init__(self, binary: Path, workdir: Path):
        self.binary = binary
        self.workdir = Path(workdir)
        self.mountpoint = self.workdir / "store"
        self.root = self.workdir / "root"
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "stargz-store.log"
        self.proc: subprocess.Popen | None = None
        # Its background fetch starts 5 s after the last prioritised task (a prefetch, a mount), and
        # it says when it is done only at debug level: settled = the link idle longer than that.
        self.quiet_seconds = 8.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> "StargzStore":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(exist_ok=True)
        self.config_path.write_text("")  # its defaults (and not /etc/stargz-store/config.toml)
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_SOCKET")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), "--root", str(self.root), "--config", str(self.config_path),
                 str(self.mountpoint)], stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stargz-store exited {self.proc.returncode}: {self.log()[-3000:]}")
            if is_serving(self.mountpoint):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"stargz-store did not mount in {timeout}s: {self.log()[-3000:]}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)  # it unmounts and exits on SIGINT
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout)
            self.proc = None
        force_unmount(self.mountpoint)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def background_done(self) -> bool:
        return True  # see quiet_seconds
