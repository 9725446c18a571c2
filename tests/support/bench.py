"""`make bench`: normal pulls against lazy pulls through `als serve`, side by side.

Everything runs on this machine: a docker-registry on 127.0.0.1 behind a link
emulator (tests/support/linkproxy.py: 20 ms RTT, 200 Mbit/s by default), a
Debian bookworm minbase + python3 image built with debootstrap (cached under
/var/tmp/als-bench-cache), pushed as plain gzip, as eStargz and as optimized
eStargz (the files `python3 -c 'print(1)'` reads, recorded by `als optimize`'s
recorder, first, then a prefetch landmark). Each measurement starts from nothing: a fresh Podman storage and,
for lazy runs, a fresh store with an empty cache. Reported: median, min and max
over --runs, and the lazy/normal ratio of the medians of the same run set.

Workloads:
  cold      podman pull + podman run IMAGE python3 -c 'print(1)'
  readall   podman pull + podman run IMAGE sh -c 'tar cf - /usr | wc -c'
            (through `wc`: GNU tar skips reading data when writing to /dev/null)
  warm      the readall command again in a new container, everything cached (for the store: once its
            background fetch has finished); each sample is the median of 3 such runs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from als.tools.image import estargz_layer, gzip_layer, push_image
from als.reference import parse_reference
from als.registry.client import RegistryClient
from als.registry.sysregistries import RegistriesConf
from tests.support.linkproxy import LinkProxy
from als.tools.podman import Podman
from tests.support.registry import RegistryProcess
from tests.support.store_process import StoreProcess, write_registries_conf

CACHE = Path("/var/tmp/als-bench-cache")
MIRROR = "http://deb.debian.org/debian"
PRINT1 = ["python3", "-c", "print(1)"]
READALL = ["sh", "-c", "tar cf - /usr 2>/dev/null | wc -c"]
LEVEL = 6  # gzip level for every variant, as docker and podman push use


@dataclass
class Sample:
    seconds: float
    bytes_fetched: int
    store_peak_rss: int = 0  # bytes, lazy runs only


@dataclass
class Series:
    name: str
    samples: list[Sample] = field(default_factory=list)

    def median(self, key: str = "seconds") -> float:
        return statistics.median(getattr(s, key) for s in self.samples)

    def summary(self) -> dict:
        secs = [s.seconds for s in self.samples]
        return {"median_s": round(self.median(), 3), "min_s": round(min(secs), 3), "max_s": round(max(secs), 3),
                "median_bytes_fetched": int(self.median("bytes_fetched")),
                "max_store_peak_rss": max(s.store_peak_rss for s in self.samples)}


def debian_python_tar() -> Path:
    """Debian bookworm minbase + python3 as an uncompressed tar, built once with debootstrap."""
    out = CACHE / "debian-bookworm-python3.tar"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
    try:
        print(f"building {out} with debootstrap (once; a few minutes) ...", flush=True)
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3", "bookworm", str(root), MIRROR],
                       check=True, stdout=subprocess.DEVNULL, timeout=1800)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(root / junk, ignore_errors=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "--sort=name", "-C", str(root), "-cf", str(tmp), "."],
                       check=True, timeout=600)
        tmp.replace(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="als-bench-"))
        self.registry = RegistryProcess(CACHE / "registry", port=args.registry_port).start()
        self.link = LinkProxy(("127.0.0.1", self.registry.port), rtt=args.rtt, bandwidth=args.bandwidth).start()
        self.conf = write_registries_conf(self.work / "registries.conf", [self.link.host, self.registry.host])
        self.sizes: dict[str, int] = {}

    def close(self) -> None:
        self.link.close()
        self.registry.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    # ---- images ----------------------------------------------------------------------
    def ref(self, tag: str) -> str:
        return f"{self.link.host}/bench/debian-python:{tag}"

    def prepare_images(self, profile: list[str]) -> None:
        tar = debian_python_tar()
        direct = RegistryClient(RegistriesConf.load(str(self.conf)))
        variants = {"gzip": None, "esgz": None, "esgz-opt": profile}
        stamp = CACHE / "pushed.json"
        pushed = json.loads(stamp.read_text()) if stamp.exists() else {}
        base = f"{tar.stat().st_size}:{tar.stat().st_mtime_ns}:{self.args.chunk_size}"
        for tag, prioritized in variants.items():
            key = f"{base}:{hashlib.sha256(repr(prioritized).encode()).hexdigest()}"
            ref = parse_reference(f"{self.registry.host}/bench/debian-python:{tag}")
            if pushed.get(tag, {}).get("key") == key:
                self.sizes[tag] = pushed[tag]["size"]
                continue
            print(f"pushing the {tag} variant ...", flush=True)
            if tag == "gzip":
                layer = gzip_layer(tar.read_bytes(), level=LEVEL)
            else:
                with open(tar, "rb") as f:
                    layer = estargz_layer(f, chunk_size=self.args.chunk_size, level=LEVEL, prioritized=prioritized)
            push_image(direct, ref, [layer])
            self.sizes[tag] = layer.size
            pushed[tag] = {"key": key, "size": layer.size}
            stamp.write_text(json.dumps(pushed))

    # ---- runs ------------------------------------------------------------------------
    def _store(self, name: str, background: bool) -> StoreProcess:
        d = self.work / name
        d.mkdir()
        cfg = "" if background else "[fetch]\nbackground = false\n"
        return StoreProcess(d, registries_conf=self.conf, config=cfg, log_level="info").start()

    def normal(self, name: str, tag: str, cmd: list[str], again: bool = False) -> tuple[Sample, Sample | None]:
        with Podman(self.work / name, insecure_registries=[self.link.host]) as podman:
            before = self.link.stats.bytes_down
            t0 = time.monotonic()
            podman.run("pull", "-q", self.ref(tag), timeout=900)
            podman.run("run", "--rm", self.ref(tag), *cmd, timeout=900)
            cold = Sample(time.monotonic() - t0, self.link.stats.bytes_down - before)
            warm = None
            if again:
                warm = Sample(warm_seconds(lambda: podman.run("run", "--rm", self.ref(tag), *cmd, timeout=900)), 0)
        return cold, warm

    def lazy(self, name: str, tag: str, cmd: list[str], background: bool,
             again: bool = False) -> tuple[Sample, Sample | None]:
        store = self._store(name + "-store", background)
        try:
            with Podman(self.work / name, additional_layer_store=store.mountpoint,
                        insecure_registries=[self.link.host]) as podman:
                before = self.link.stats.bytes_down
                t0 = time.monotonic()
                podman.run("pull", "-q", self.ref(tag), timeout=900)
                out = podman.run("run", "--rm", self.ref(tag), *cmd, timeout=900).stdout
                cold = Sample(time.monotonic() - t0, self.link.stats.bytes_down - before, peak_rss(store.proc.pid))
                if "declined" in store.log():
                    raise RuntimeError(f"the store declined a layer of {tag}: {store.log()[-2000:]}")
                warm = None
                if again:
                    wait_until_fetched(store)

                    def run_again():
                        assert podman.run("run", "--rm", self.ref(tag), *cmd, timeout=900).stdout == out
                    warm = Sample(warm_seconds(run_again), 0, peak_rss(store.proc.pid))
                return cold, warm
        finally:
            store.stop()


WARM_REPEATS = 3


def warm_seconds(run) -> float:
    """The median of WARM_REPEATS timed runs: one warm run is a few tenths of a second, and a busy
    moment on a shared machine moves a single one by as much as the difference being measured."""
    times = []
    for _ in range(WARM_REPEATS):
        t0 = time.monotonic()
        run()
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def wait_until_fetched(store: StoreProcess, timeout: float = 300.0) -> None:
    """Warm means everything cached: wait for the background fetch to finish (it logs when it has)."""
    deadline = time.monotonic() + timeout
    while "background fetch done" not in store.log():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the background fetch did not finish in {timeout:.0f}s: {store.log()[-2000:]}")
        time.sleep(0.2)


def record_profile(bench: Bench) -> list[str]:
    """The files `python3 -c 'print(1)'` opens, in order, recorded by `als optimize`'s own recorder."""
    from als.tools.optimize import record
    (bench.work / "profile").mkdir()
    saved = os.environ.get("CONTAINERS_REGISTRIES_CONF")
    os.environ["CONTAINERS_REGISTRIES_CONF"] = str(bench.conf)  # the recording store reads it, as Podman does
    try:
        files, _ = record(bench.ref("esgz"), PRINT1, bench.work / "profile", timeout=120,
                          registries_conf=str(bench.conf))
    finally:
        if saved is None:
            os.environ.pop("CONTAINERS_REGISTRIES_CONF", None)
        else:
            os.environ["CONTAINERS_REGISTRIES_CONF"] = saved
    if not files:
        raise RuntimeError("recording the print(1) workload saw no file reads: the store declined the image?")
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rtt", type=float, default=0.020, help="seconds (default: 0.020)")
    ap.add_argument("--bandwidth", type=float, default=200e6, help="bits per second (default: 200e6)")
    ap.add_argument("--chunk-size", type=int, default=1 << 20)
    ap.add_argument("--registry-port", type=int, default=0)
    ap.add_argument("--out", default="bench-results.json")
    args = ap.parse_args(argv)

    bench = Bench(args)
    try:
        profile_path = CACHE / "print1.profile"
        bench.prepare_images(profile_path.read_text().split() if profile_path.exists() else [])
        if not profile_path.exists():
            profile_path.write_text("\n".join(record_profile(bench)) + "\n")
            bench.prepare_images(profile_path.read_text().split())
        s = {k: Series(k) for k in ("cold-normal", "cold-lazy", "cold-lazy-opt", "readall-normal",
                                    "readall-lazy", "warm-normal", "warm-lazy")}
        for i in range(args.runs):
            print(f"run {i + 1}/{args.runs} ...", flush=True)
            s["cold-normal"].samples.append(bench.normal(f"cn{i}", "gzip", PRINT1)[0])
            s["cold-lazy"].samples.append(bench.lazy(f"cl{i}", "esgz", PRINT1, background=False)[0])
            s["cold-lazy-opt"].samples.append(bench.lazy(f"co{i}", "esgz-opt", PRINT1, background=False)[0])
            cold, warm = bench.normal(f"rn{i}", "gzip", READALL, again=True)
            s["readall-normal"].samples.append(cold)
            s["warm-normal"].samples.append(warm)
            cold, warm = bench.lazy(f"rl{i}", "esgz", READALL, background=True, again=True)
            s["readall-lazy"].samples.append(cold)
            s["warm-lazy"].samples.append(warm)
        report(bench, s, args)
    finally:
        bench.close()
    return 0


def report(bench: Bench, s: dict[str, Series], args) -> None:
    ratios = {
        "cold start, eStargz / normal": s["cold-lazy"].median() / s["cold-normal"].median(),
        "cold start, optimized eStargz / normal": s["cold-lazy-opt"].median() / s["cold-normal"].median(),
        "read everything, lazy / normal": s["readall-lazy"].median() / s["readall-normal"].median(),
        "warm read time, lazy / normal": s["warm-lazy"].median() / s["warm-normal"].median(),
    }
    fetched = {
        "cold start eStargz, share of the image": s["cold-lazy"].median("bytes_fetched") / bench.sizes["esgz"],
        "cold start optimized, share of the image":
            s["cold-lazy-opt"].median("bytes_fetched") / bench.sizes["esgz-opt"],
    }
    result = {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "link": {"rtt_s": args.rtt, "bandwidth_bit_s": args.bandwidth},
        "runs": args.runs, "image_compressed_bytes": bench.sizes,
        "series": {k: v.summary() for k, v in s.items()},
        "raw": {k: [asdict(x) for x in v.samples] for k, v in s.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "bytes_fetched_share": {k: round(v, 4) for k, v in fetched.items()},
        "store_peak_rss_bytes": max(x.store_peak_rss for k, v in s.items() for x in v.samples),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nlink: {args.rtt * 1000:.0f} ms RTT, {args.bandwidth / 1e6:.0f} Mbit/s; image "
          f"{bench.sizes['gzip'] / 1e6:.1f} MB gzip, {bench.sizes['esgz'] / 1e6:.1f} MB eStargz; "
          f"{args.runs} runs; median [min-max] seconds")
    print(f"{'series':<16}{'median':>9}{'min':>9}{'max':>9}{'MB fetched':>12}")
    for k, v in s.items():
        sm = v.summary()
        print(f"{k:<16}{sm['median_s']:>9.2f}{sm['min_s']:>9.2f}{sm['max_s']:>9.2f}"
              f"{sm['median_bytes_fetched'] / 1e6:>12.1f}")
    print()
    for k, v in ratios.items():
        print(f"{k:<42}{v:>7.3f}")
    for k, v in fetched.items():
        print(f"{k:<42}{v:>7.3f}")
    print(f"{'store peak memory (MB)':<42}{result['store_peak_rss_bytes'] / 1e6:>7.1f}")
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    sys.exit(main())
