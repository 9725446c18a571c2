"""One `make bench` sample: a fresh Podman (and, for a lazy variant, a fresh store) running one workload.

A sample is timed in two phases, ``podman pull`` and ``podman run``; what the
registry sent is read from its access log (responses completed by the time the
container exited, then once the link has gone quiet: the background fetch goes
on after the container) and from the link emulator (bytes that crossed it by
the exit, finished responses or not).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from als.tools.podman import Podman
from tests.support.linkproxy import LinkProxy
from tests.support.procstat import cpu_seconds, peak_rss_mib, stolen_seconds, written_bytes
from tests.support.registry import RegistryProcess
from tests.support.store_process import StoreProcess

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO / "config" / "config.toml"
WARM_REPEATS = 3
SETTLE_TIMEOUT = 300.0


class LazyStore(Protocol):
    mountpoint: Path
    quiet_seconds: float  # settled: the link idle this long, and the store done by its own word


    @property
    def pid(self) -> int: ...

    def stop(self) -> None: ...

    def log(self) -> str: ...

    def background_done(self) -> bool: ...


@dataclass
class Variant:
    """One column: ``kind`` is "normal", "als" or "stargz-store"; ``config`` the als config file's text;
    ``image`` the tag a lazy column pulls in every workload instead of the workload's own (the indexed
    gzip image: the same workloads on an image that was not converted)."""
    name: str
    label: str
    kind: str
    config: str = ""
    headline: bool = False
    checkout: str = ""  # als from another checkout (--als-base): a before/after column
    image: str = ""


def shipped_config() -> str:
    return SHIPPED_CONFIG.read_text()


def background_off(config: str) -> str:
    """The shipped file with ``[fetch] background`` turned off, every other key as shipped."""
    out, section, changed = [], "", 0
    for line in config.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        elif section == "[fetch]" and stripped.replace(" ", "") == "background=true":
            line, changed = "background = false\n", changed + 1
        out.append(line)
    if changed != 1:
        raise RuntimeError(f"{SHIPPED_CONFIG} has no single `background = true` under [fetch] to turn off")
    return "".join(out)


class AlsStore:
    """`als serve` with the variant's config file, as a LazyStore."""

    def __init__(self, workdir: Path, registries_conf: Path, config: str, checkout: str = ""):
        workdir.mkdir(parents=True, exist_ok=True)
        self.process = StoreProcess(workdir, registries_conf=registries_conf, config=config, log_level="info",
                                    repo=Path(checkout) if checkout else None)
        self.mountpoint = self.process.mountpoint
        self.background = "background = false" not in config
        self.quiet_seconds = 3.0  # it says when its background fetch is done

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def start(self) -> "AlsStore":
        self.process.start()
        return self

    def stop(self) -> None:
        self.process.stop()

    def log(self) -> str:
        return self.process.log()

    def background_done(self) -> bool:
        return not self.background or "background fetch done" in self.log()


@dataclass
class Sample:
    seconds: float                 # pull + run
    pull_seconds: float
    run_seconds: float
    registry_bytes_at_exit: int    # responses the registry had completed when the container exited
    link_bytes_at_exit: int        # bytes that had crossed the link by then
    registry_bytes_settled: int = 0  # once the link has gone quiet after the exit
    settle_seconds: float = 0.0    # from the exit to the last byte of that
    store_peak_rss: int = 0        # VmHWM at the exit, bytes (lazy variants)
    warm_after_s: float = 0.0      # read-all only: the same command at once, in a new container
    warm_settled_s: float = 0.0    # read-all only: median of WARM_REPEATS once settled
    store_cpu_user_s: float = 0.0  # the store's CPU from its start to the container's exit (lazy variants)
    store_cpu_sys_s: float = 0.0
    host_steal_cpus: float = 0.0   # CPUs the hypervisor took for others during pull + run, on average
    warm_steal_cpus: float = 0.0   # the same during the warm runs (read-all only)
    warm_store_mb: float = 0.0     # what the store wrote during them: pages the kernel had dropped, read
                                   # back through it, and (at once) its cache's writes


def blob_bytes(registry: RegistryProcess, mark: int, settle: float) -> int:
    return sum(a.written for a in registry.accesses_since(mark, settle=settle) if a.method == "GET")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def settle(link: LinkProxy, store: LazyStore | None) -> float:
    """Wait until the link has been idle the store's quiet_seconds (3 s for a normal pull) and the store
    says it is done; seconds to the last byte."""
    t0 = time.monotonic()
    last, last_change = link.stats.bytes_down, t0
    while True:
        time.sleep(0.1)
        now = time.monotonic()
        if link.stats.bytes_down != last:
            last, last_change = link.stats.bytes_down, now
        quiet = store.quiet_seconds if store is not None else 3.0
        if now - last_change >= quiet and (store is None or store.background_done()):
            return last_change - t0
        if now - t0 > SETTLE_TIMEOUT:
            raise RuntimeError(f"nothing settled {SETTLE_TIMEOUT:.0f}s after the container exited")


def unpacked_bytes(graphroot: Path) -> int:
    """Bytes of the layers Podman unpacked itself: near zero when the store served them (a layer
    from the store is a symlink to its `diff`, not followed)."""
    total = 0
    for diff in (graphroot / "overlay").glob("*/diff"):
        if diff.is_symlink():
            continue
        for p in diff.rglob("*"):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def run_sample(podman: Podman, ref: str, cmd: list[str], registry: RegistryProcess, link: LinkProxy,
               store: LazyStore | None, read_all: bool, wait_settled: bool = True) -> Sample:
    mark, link0, stolen0 = registry.mark(), link.stats.bytes_down, stolen_seconds()
    pull = timed(lambda: podman.run("pull", "-q", ref, timeout=900))
    if store is not None and unpacked_bytes(podman.graphroot) > 8 << 20:
        raise RuntimeError(f"Podman unpacked {ref} itself: the store did not serve it ({store.log()[-1500:]})")
    out: list[str] = []
    run = timed(lambda: out.append(podman.run("run", "--rm", ref, *cmd, timeout=900).stdout))
    s = Sample(pull + run, pull, run, blob_bytes(registry, mark, 0), link.stats.bytes_down - link0)
    s.host_steal_cpus = (stolen_seconds() - stolen0) / (pull + run)
    if store is not None:
        s.store_peak_rss = int(peak_rss_mib(store.pid) * (1 << 20))
        s.store_cpu_user_s, s.store_cpu_sys_s = cpu_seconds(store.pid)

    warm_seconds = warm_stolen = 0.0

    def again() -> float:
        """The same command in a new container, timed; the host's steal and the store's writes meanwhile
        are added up."""
        nonlocal warm_seconds, warm_stolen
        stolen0, written0, t0 = stolen_seconds(), written_bytes(store.pid) if store else 0, time.monotonic()
        printed = podman.run("run", "--rm", ref, *cmd, timeout=900).stdout
        seconds = time.monotonic() - t0
        warm_seconds, warm_stolen = warm_seconds + seconds, warm_stolen + stolen_seconds() - stolen0
        s.warm_steal_cpus = warm_stolen / warm_seconds
        if store is not None:
            s.warm_store_mb += (written_bytes(store.pid) - written0) / 1e6
        if printed != out[0]:
            raise RuntimeError(f"{ref}: {cmd} printed something else in a new container")
        return seconds

    if read_all:
        s.warm_after_s = again()
    if not wait_settled:
        return s
    s.settle_seconds = settle(link, store) if store is not None else 0.0
    s.registry_bytes_settled = blob_bytes(registry, mark, 0.3)
    if read_all:
        s.warm_settled_s = statistics.median(again() for _ in range(WARM_REPEATS))
    return s
