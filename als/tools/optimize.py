"""`als optimize`: learn which files a workload reads, then write them first in every layer.

Why this way: the store already sees every file a container opens in a lazily
pulled layer, in order and per layer, so no sandbox or tracer is needed. The
image is converted once as it is (to DST's repository, by digest only, or to
--work-ref), served by a private `als serve` to a private Podman (temporary
storage.conf naming the store, graphroot in a temp dir, so the user's Podman
state is never touched), the workload runs until it exits or --timeout stops
it, and the recorded order becomes the profile for the final conversion:
those files first, then `.prefetch.landmark`, which tells a store to fetch
them all in one request as soon as the layer is looked up.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from als.ops import control
from als.layer.access import OP_PROFILE, OP_RECORD
from als.tools.convert import ConvertOptions, convert
from als.errors import ALSError
from als.tools.podman import Podman
from als.tools.profile import write_profile
from als.tools.progress import Progress
from als.reference import Reference
from als.tools.transport import OCILayout, RegistryImage, open_transport

log = logging.getLogger("als.optimize")

MOUNT_TIMEOUT = 30.0
PULL_TIMEOUT = 600.0
STOP_TIMEOUT = 20.0


class OptimizeError(ALSError):
    """The workload could not be run or recorded; nothing was stored under DST."""


@dataclass
class OptimizeOptions:
    convert: ConvertOptions = field(default_factory=ConvertOptions)
    command: list[str] = field(default_factory=list)
    timeout: float = 60.0
    profile_out: str | None = None
    work_ref: str | None = None
    work_dir: str | None = None
    config_path: str | None = None  # handed to the private `als serve`


@dataclass
class OptimizeResult:
    destination: str
    digest: str
    recorded: list[str] | None  # None when a given profile was reused
    workload_exit: int | None = None  # None when stopped by the timeout (or not run)


def optimize(src_spec: str, dst_spec: str, opts: OptimizeOptions, config,
             progress: Progress | None = None) -> OptimizeResult:
    """Record (unless a profile was given), then convert SRC to DST with the profile's files first."""
    progress = progress or Progress(enabled=False)
    made = []

    def client():
        if not made:
            from als.registry.configured import registry_client
            made.append(registry_client(config))
        return made[0]

    src = open_transport(src_spec, client)
    dst = open_transport(dst_spec, client)
    recorded = None
    exit_code = None
    if opts.convert.prioritized:
        if opts.command:
            log.warning("a profile was given with --prioritize: the workload is not run")
        order = list(opts.convert.prioritized)
    else:
        work = _work_location(dst, opts.work_ref, client)
        with tempfile.TemporaryDirectory(prefix="als-optimize-", dir=opts.work_dir) as tmp:
            progress.message(f"converting {src} as it is, to run the workload from {work}")
            plain = convert(src, work, opts.convert, progress, workdir=tmp, tagged=bool(opts.work_ref))
            run_ref = _run_ref(work, plain.digest)
            progress.message(f"running {' '.join(opts.command)} in {run_ref} (at most {opts.timeout:g} s)")
            order, exit_code = record(run_ref, opts.command, Path(tmp), opts.timeout, opts.config_path,
                                      registries_conf=config.registry.registries_conf or None)
        recorded = order
        if not order:
            raise OptimizeError(f"the workload read no file of {src} through the store; nothing to optimize "
                                f"(did it run? exit status {exit_code})")
        log.info("recorded %d files read by the workload", len(order))
    if opts.profile_out:
        write_profile(opts.profile_out, order, comment=f"als optimize profile of {src_spec}: files in the "
                                                       "order the workload first read them")
    final = replace(opts.convert, prioritized=order, reconvert=True)
    result = convert(src, dst, final, progress)
    return OptimizeResult(destination=str(dst), digest=result.digest, recorded=recorded, workload_exit=exit_code)


def _work_location(dst, work_ref: str | None, client):
    """Where the unprioritized image goes: --work-ref, else DST's repository by digest only."""
    if work_ref:
        work = open_transport(work_ref, client)
        if not isinstance(work, RegistryImage):
            raise OptimizeError("--work-ref must be a registry reference: `als serve` reads from registries")
        return work
    if isinstance(dst, OCILayout):
        raise OptimizeError("DST is an OCI layout, which `als serve` cannot read the workload's image from: "
                            "give --work-ref REGISTRY/REPO:TAG for the intermediate image")
    ref = dst.ref
    return RegistryImage(dst.client, Reference(ref.registry, ref.repository, tag=None, digest=None))


def _run_ref(work: RegistryImage, digest: str) -> str:
    return f"{work.ref.name}@{digest}"


def _serving(path: Path) -> bool:
    target = str(path.resolve())
    try:
        with open("/proc/self/mountinfo") as f:
            if not any(line.split()[4] == target for line in f):
                return False
        os.statvfs(path)  # a dead mount fails it; stat and listings may come from the kernel's caches
    except OSError:
        return False
    return True


class _Store:
    """A private `als serve` in a temp dir: started, waited for, stopped by PID, unmounted."""

    def __init__(self, work: Path, config_path: str | None):
        self.mountpoint = work / "store"
        self.root = work / "root"
        self.log_path = work / "als-serve.log"
        self.config_path = config_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "_Store":
        args = [sys.executable, "-m", "als", "serve", "--root", str(self.root), "--log-level", "info"]
        if self.config_path:
            args += ["--config", self.config_path]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(args + [str(self.mountpoint)], stdout=logf, stderr=logf,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OptimizeError(f"als serve exited with {self.proc.returncode}: {self.log_tail()}")
            if _serving(self.mountpoint):
                return self
            time.sleep(0.05)
        self.stop()
        raise OptimizeError(f"als serve did not mount {self.mountpoint} within {MOUNT_TIMEOUT:g} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # for good: SIGTERM would leave the mount to a next store
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self.proc = None
        for cmd in (["fusermount3", "-u", "-z", str(self.mountpoint)], ["umount", "-l", str(self.mountpoint)]):
            if not _serving(self.mountpoint):
                break
            subprocess.run(cmd, capture_output=True, timeout=30)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _user_registries_conf(configured: str | None) -> str | None:
    """The registries.conf `als serve` reads: the configured one, else the one the user's Podman reads."""
    if configured:
        return configured
    env = os.environ.get("CONTAINERS_REGISTRIES_CONF")
    if env:
        return env
    from als.registry.sysregistries import RegistriesConf
    files = [f for f in RegistriesConf.load().files if Path(f).is_file()]
    return str(files[0]) if files else None


def _user_auth_file() -> str | None:
    """The auth file the user's Podman would use, if there is one."""
    candidates = [os.environ.get("REGISTRY_AUTH_FILE", "")]
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    candidates.append(f"/run/containers/{os.getuid()}/auth.json")
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def record(run_ref: str, command: list[str], work: Path, timeout: float, config_path: str | None = None,
           registries_conf: str | None = None) -> tuple[list[str], int | None]:
    """Run ``command`` in ``run_ref`` with Podman through a private store; return the files it read, in order.

    The workload is stopped (its whole PID namespace killed) after ``timeout``
    seconds; the second value is its exit status, or None when it was stopped.
    """
    store = _Store(work, config_path).start()
    podman = None
    try:
        control.request(store.root, OP_RECORD, enable=True, clear=True)
        podman = Podman(work / "podman", additional_layer_store=store.mountpoint,
                        registries_conf=_user_registries_conf(registries_conf), auth_file=_user_auth_file())
        podman.pull(run_ref, timeout=PULL_TIMEOUT)
        exit_code = _run_bounded(podman, run_ref, command, timeout, work / "workload.log")
        profile = control.request(store.root, OP_PROFILE)
        control.request(store.root, OP_RECORD, enable=False)
    except ALSError:
        raise
    except Exception as e:  # Podman failures carry their output; say what we were doing
        raise OptimizeError(f"running the workload in {run_ref} failed: {e}\nals serve log: {store.log_tail()}") from None
    finally:
        if podman is not None:
            podman.close()
        store.stop()
    return list(profile.get("order", [])), exit_code


def _run_bounded(podman: Podman, ref: str, command: list[str], timeout: float, log_path: Path) -> int | None:
    with open(log_path, "wb") as out:
        proc = podman.popen("run", "--rm", "--pull=never", ref, *command, stdout=out, stderr=out,
                            stdin=subprocess.DEVNULL)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.info("the workload ran for %g s: stopping it", timeout)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the PID namespace's init: the container dies with it
            except ProcessLookupError:
                pass
            proc.wait(STOP_TIMEOUT)
            return None
    if code != 0:
        tail = log_path.read_bytes()[-1500:].decode(errors="replace")
        log.warning("the workload exited with status %d; what it read so far is used. Its output ends: %s",
                    code, tail)
    return code
