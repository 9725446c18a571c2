"""What a process costs, from /proc: peak memory and thread count, sampled while a test runs; and
what the machine's hypervisor took from it meanwhile.

Memory and thread bounds are claims about the daemon process, so they are
measured on it (``VmHWM``, ``Threads`` in /proc/<pid>/status), not inferred
from the test's own process.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def _keyed(path: str) -> dict[str, str]:
    """A /proc file of ``key: value`` lines."""
    out = {}
    for line in Path(path).read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def status(pid: int) -> dict[str, str]:
    return _keyed(f"/proc/{pid}/status")


def _kib(value: str) -> int:
    return int(value.split()[0])


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the highest resident set size since start or since ``reset_peak``."""
    return _kib(status(pid)["VmHWM"]) / 1024


def rss_mib(pid: int) -> float:
    return _kib(status(pid)["VmRSS"]) / 1024


def threads(pid: int) -> int:
    return int(status(pid)["Threads"])


def reset_peak(pid: int) -> None:
    """Make VmHWM start again from the current RSS (Linux: "5" to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass
class Sampler:
    """Samples a process's thread count and RSS every ``interval`` seconds in a thread of its own."""

    pid: int
    interval: float = 0.02
    max_threads: int = 0
    max_rss_mib: float = 0.0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "Sampler":
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                st = status(self.pid)
            except OSError:
                return
            self.max_threads = max(self.max_threads, int(st["Threads"]))
            self.max_rss_mib = max(self.max_rss_mib, _kib(st["VmRSS"]) / 1024)
            self.samples += 1
            time.sleep(self.interval)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process and its threads so far (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def written_bytes(pid: int) -> int:
    """Bytes a process has written so far, to files, pipes and devices alike (``wchar`` in
    /proc/PID/io): for the store, its FUSE replies and its cache's writes."""
    try:
        return int(_keyed(f"/proc/{pid}/io")["wchar"])
    except (OSError, KeyError):
        return 0


def stolen_seconds(stat_text: str | None = None) -> float:
    """CPU seconds the hypervisor gave other guests while this machine's CPUs had work, summed over
    them since boot (the ``steal`` column of /proc/stat's ``cpu`` line): a virtual machine whose host
    is busy runs everything slower, and this says when."""
    text = stat_text if stat_text is not None else Path("/proc/stat").read_text()
    fields = text.split("\n", 1)[0].split()
    if fields[0] != "cpu" or len(fields) < 9:
        raise ValueError(f"not a /proc/stat cpu line: {text[:80]!r}")
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")
