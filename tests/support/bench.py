"""`make bench`: what users run, side by side: a normal pull, als as shipped, and the reference store.

Everything runs on this machine: a docker-registry on 127.0.0.1 behind a link
emulator (tests/support/linkproxy.py: 20 ms RTT, 200 Mbit/s by default), a
Debian bookworm minbase + python3 image built with debootstrap (cached under
/var/tmp/als-bench-cache), pushed as plain gzip, as eStargz and as optimized
eStargz (the files `python3 -c 'print(1)'` reads, recorded by `als optimize`'s
recorder, first, then a prefetch landmark), and the gzip image indexed by `als
index` with its defaults into a tag of its own (every run: its time and size
are figures). Each sample starts from nothing: a fresh Podman storage and, for
lazy runs, a fresh store with an empty cache.

Columns (variants), in one run, the order reversed every other round:
  normal        Podman pulls the gzip image itself
  als           `als serve` with config/config.toml as shipped: every headline figure
  als-gzindex   the same config on the indexed gzip image (no conversion): cold and readall
  als-nobg      the same with `[fetch] background = false`: an extra, labelled column
  stargz-store  containerd/stargz-snapshotter's store with its own defaults: the reference
                (tests/support/bench_stargz.py: how it is found or built; without it the
                column is left out and the reason printed)
  als-base      --als-base CHECKOUT: `als serve` from another checkout, with its shipped config
                (a before/after column; --workloads and --columns run a part of the bench)

Workloads:
  cold      podman pull + podman run IMAGE python3 -c 'print(1)'
  cold-opt  the same, optimized eStargz (lazy variants; divided by the normal pull's cold; bytes
            by the exit only: waiting for stargz-store's background fetch would add 45 s a round)
  readall   podman pull + podman run IMAGE sh -c 'tar cf - /usr | wc -c'
            (through `wc`: GNU tar skips reading data when writing to /dev/null); then the
            same again in a new container at once (whatever the store is still fetching or
            writing), and, once the link has been quiet 3 s and the store says its background
            fetch is done, the median of 3 more

Reported: median and min-max over --runs, the ratio of each back-to-back pair
(lazy / normal pull of the same round), bytes the registry sent by the time the
container exited and once the link went quiet, the store's VmHWM; for the
indexed image, its index blobs over its layer blobs, and its cold start and
bytes over the eStargz image's (the `als` column of the same round).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from als.oci import GZIP_INDEX_ANNOTATION
from als.reference import parse_reference
from als.registry.client import RegistryClient
from als.registry.sysregistries import RegistriesConf
from als.tools.image import estargz_layer, gzip_layer, push_image
from als.tools.podman import Podman
from tests.support import bench_stargz
from tests.support.alsrun import get_blob, get_json, run_als
from tests.support.bench_report import Series, compute, index_figure, print_tables, result_json
from tests.support.bench_runs import AlsStore, LazyStore, Sample, Variant, background_off, run_sample, shipped_config
from tests.support.linkproxy import LinkProxy
from tests.support.registry import RegistryProcess
from tests.support.store_process import write_registries_conf

CACHE = Path("/var/tmp/als-bench-cache")
MIRROR = "http://deb.debian.org/debian"
PRINT1 = ["python3", "-c", "print(1)"]
READALL = ["sh", "-c", "tar cf - /usr 2>/dev/null | wc -c"]
LEVEL = 6  # gzip level for every variant, as docker and podman push use
REPO_NAME = "bench/debian-python"
QUIET = 1.0  # seconds of quiet between samples, after the last one's files are synced to disk


@dataclass
class Workload:
    name: str
    tag: str  # the lazy variants' image; the normal pull always pulls "gzip"
    cmd: list[str]
    read_all: bool
    normal: bool  # the normal pull runs it too
    settle: bool  # wait for the link to go quiet after the exit (stargz-store's background fetch: ~45 s)
    any_image: bool = True  # a column with an image of its own (Variant.image) runs it on that image


WORKLOADS = [Workload("cold", "esgz", PRINT1, False, True, True),
             Workload("cold-opt", "esgz-opt", PRINT1, False, False, False, any_image=False),
             Workload("readall", "esgz", READALL, True, True, True)]


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


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="als-bench-", dir="/var/tmp"))
        # The images stay in the cache; the config and the access log (the byte counts) are this run's
        # own, so another `make bench` at the same time cannot add its requests to ours.
        self.registry = RegistryProcess(self.work / "registry", port=args.registry_port, extra={"storage": {
            "filesystem": {"rootdirectory": str(CACHE / "registry" / "data")}, "delete": {"enabled": True}}}).start()
        self.link = LinkProxy(("127.0.0.1", self.registry.port), rtt=args.rtt, bandwidth=args.bandwidth).start()
        self.conf = write_registries_conf(self.work / "registries.conf", [self.link.host, self.registry.host])
        self.sizes: dict[str, int] = {}
        self.stargz: Path | None = None
        self.stargz_note = ""  # how the reference store was found, or why it is left out
        self.index: dict = {}  # the gzindex image: index_figure()

    def close(self) -> None:
        self.link.close()
        self.registry.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    # ---- images ----------------------------------------------------------------------
    def ref(self, tag: str) -> str:
        return f"{self.link.host}/{REPO_NAME}:{tag}"

    def prepare_images(self, profile: list[str]) -> None:
        tar = debian_python_tar()
        direct = RegistryClient(RegistriesConf.load(str(self.conf)))
        variants = {"gzip": None, "esgz": None, "esgz-opt": profile}
        stamp = CACHE / "pushed.json"
        pushed = json.loads(stamp.read_text()) if stamp.exists() else {}
        base = f"{tar.stat().st_size}:{tar.stat().st_mtime_ns}:{self.args.chunk_size}"
        for tag, prioritized in variants.items():
            key = f"{base}:{hashlib.sha256(repr(prioritized).encode()).hexdigest()}"
            ref = parse_reference(f"{self.registry.host}/{REPO_NAME}:{tag}")
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

    def index_gzip(self) -> None:
        """`als index` the gzip image into its own tag, as a user runs it (defaults, straight to the
        registry, not through the link), every run: the build time is a figure, and no index an older
        writer made is measured. Same repository: only the index blobs are uploaded."""
        src, dst = (f"{self.registry.host}/{REPO_NAME}:{t}" for t in ("gzip", "gzindex"))
        print(f"als index {src} {dst} ...", flush=True)
        t0 = time.monotonic()
        done = run_als("index", src, dst, conf=self.conf, timeout=1800)
        seconds = time.monotonic() - t0
        if done.returncode != 0:
            raise RuntimeError(f"als index failed ({done.returncode}): {done.stderr[-2000:]}")
        layers = get_json(self.registry, REPO_NAME, "gzindex")["layers"]
        indexes = [(d.get("annotations") or {}).get(GZIP_INDEX_ANNOTATION) for d in layers]
        if not all(indexes):
            raise RuntimeError(f"als index left layers without an index: {layers}")
        index_bytes = sum(len(get_blob(self.registry, REPO_NAME, digest)) for digest in indexes)
        self.sizes["gzindex"] = sum(int(d["size"]) for d in layers)
        self.index = index_figure(index_bytes, self.sizes["gzindex"], len(layers), seconds)
        print(f"  {index_bytes / 1e3:.0f} kB of index for {self.sizes['gzindex'] / 1e6:.1f} MB of layers "
              f"({100 * self.index['fraction']:.2f}%), {seconds:.1f}s", flush=True)

    # ---- samples ---------------------------------------------------------------------
    def sample(self, variant: Variant, workload: Workload, name: str) -> Sample:
        d = self.work / name
        d.mkdir(parents=True)
        store: LazyStore | None = None
        try:
            if variant.kind == "als":
                store = AlsStore(d / "store", self.conf, variant.config, variant.checkout).start()
            elif variant.kind == "stargz-store":
                assert self.stargz is not None
                store = bench_stargz.StargzStore(self.stargz, d / "store").start()
            tag = "gzip" if store is None else variant.image or workload.tag
            with Podman(d / "podman", additional_layer_store=store.mountpoint if store else None,
                        insecure_registries=[self.link.host]) as podman:
                return run_sample(podman, self.ref(tag), workload.cmd, self.registry, self.link, store,
                                  workload.read_all, workload.settle)
        finally:
            if store is not None:
                store.stop()
            shutil.rmtree(d, ignore_errors=True)
            # A normal pull leaves 160 MB unpacked: its removal is written back while the next sample
            # runs, and slowed whichever came next by up to 0.1 s. Every sample starts on a quiet disk.
            os.sync()
            time.sleep(QUIET)


def variants(bench: Bench) -> list[Variant]:
    shipped = shipped_config()
    out = [Variant("normal", "normal pull (Podman pulls the gzip image)", "normal"),
           Variant("als", "als, config/config.toml as shipped (headline)", "als", shipped, headline=True),
           Variant("als-gzindex", "als as shipped, the gzip image indexed by `als index` (not converted)",
                   "als", shipped, image="gzindex"),
           Variant("als-nobg", "als, as shipped but [fetch] background = false (extra)", "als",
                   background_off(shipped))]
    if getattr(bench.args, "als_base", ""):
        base = Path(bench.args.als_base).resolve()
        out.append(Variant("als-base", f"als from {base}, its config/config.toml as shipped (before/after)", "als",
                           (base / "config" / "config.toml").read_text(), checkout=str(base)))
    columns = getattr(bench.args, "columns", "")
    if columns:
        out = [v for v in out if v.name in columns.split(",")]
    if bench.args.no_reference or columns and "stargz-store" not in columns.split(","):
        print("reference column left out", flush=True)
        return out
    binary, how = bench_stargz.obtain(CACHE, bench.args.stargz_store or os.environ.get("STARGZ_STORE"))
    print(f"stargz-store: {how}", flush=True)
    bench.stargz_note = how
    if binary is None:
        print("running without the reference column", flush=True)
        return out
    bench.stargz = binary
    return out + [Variant("stargz-store", "stargz-store, its own defaults (reference)", "stargz-store")]


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
    ap.add_argument("--runs", type=int, default=4, help="rounds (default: 4, about 14 minutes on 2 cores)")
    ap.add_argument("--rtt", type=float, default=0.020, help="seconds (default: 0.020)")
    ap.add_argument("--bandwidth", type=float, default=200e6, help="bits per second (default: 200e6)")
    ap.add_argument("--chunk-size", type=int, default=1 << 20)
    ap.add_argument("--registry-port", type=int, default=0)
    ap.add_argument("--stargz-store", default=None, help="the reference store's binary (default: found or built)")
    ap.add_argument("--no-reference", action="store_true", help="leave the stargz-store column out")
    ap.add_argument("--out", default="bench-results.json")
    ap.add_argument("--workloads", default="", help="only these, comma-separated (cold,cold-opt,readall)")
    ap.add_argument("--columns", default="",
                    help="only these, comma-separated (normal,als,als-nobg,stargz-store,als-base)")
    ap.add_argument("--als-base", default="", metavar="CHECKOUT",
                    help="an extra column, als-base: `als serve` from another checkout of als (before/after)")
    args = ap.parse_args(argv)

    started = time.monotonic()
    bench = Bench(args)
    try:
        profile_path = CACHE / "print1.profile"
        bench.prepare_images(profile_path.read_text().split() if profile_path.exists() else [])
        if not profile_path.exists():
            profile_path.write_text("\n".join(record_profile(bench)) + "\n")
            bench.prepare_images(profile_path.read_text().split())
        bench.index_gzip()
        cols = variants(bench)
        series: dict[tuple[str, str], Series] = {}
        orders = []
        measuring = time.monotonic()
        for rnd in range(args.runs):
            order = list(cols) if rnd % 2 == 0 else cols[::-1]
            orders.append([v.name for v in order])
            print(f"round {rnd + 1}/{args.runs}: {', '.join(orders[-1])} ...", flush=True)
            for w in WORKLOADS:
                if args.workloads and w.name not in args.workloads.split(","):
                    continue
                for v in order:
                    if v.kind == "normal" and not w.normal or v.image and not w.any_image or v not in cols:
                        continue
                    t0 = time.monotonic()
                    try:
                        sample = bench.sample(v, w, f"r{rnd}-{w.name}-{v.name}")
                    except Exception as e:  # the reference store failing is no reason to lose the run
                        if v.kind != "stargz-store":
                            raise
                        bench.stargz_note = f"{bench.stargz_note}; failed in round {rnd + 1} ({w.name}): {e}"
                        print(f"stargz-store failed, the rest of the run goes on without it: {e}", flush=True)
                        cols.remove(v)
                        continue
                    series.setdefault((w.name, v.name), Series(w.name, v.name)).samples[rnd] = sample
                    settled = (f"{sample.registry_bytes_settled / 1e6:8.1f} MB settled" if w.settle
                               else "  (not waited for)")
                    print(f"  {w.name:<9}{v.name:<13}{sample.seconds:7.2f}s (pull {sample.pull_seconds:.2f}s)"
                          f"{sample.registry_bytes_at_exit / 1e6:8.1f} MB by the exit"
                          f"{settled}  [{time.monotonic() - t0:.0f}s]", flush=True)
        rows = compute(series, cols, args.runs, bench.sizes["esgz"], bench.sizes["esgz-opt"],
                       {v.name: bench.sizes[v.image] for v in cols if v.image})
        meta = {
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                        "podman": podman_version()},
            "link": {"rtt_s": args.rtt, "bandwidth_bit_s": args.bandwidth},
            "runs": args.runs, "orders": orders, "image_compressed_bytes": bench.sizes, "gzip_index": bench.index,
            "reference": ({"note": bench.stargz_note, **bench_stargz.describe(bench.stargz)} if bench.stargz
                          else {"note": bench.stargz_note or "left out"}),
            "seconds": {"total": round(time.monotonic() - started), "measuring": round(time.monotonic() - measuring)},
        }
        Path(args.out).write_text(json.dumps(result_json(series, cols, rows, meta), indent=2) + "\n")
        print(f"\nlink: {args.rtt * 1000:.0f} ms RTT, {args.bandwidth / 1e6:.0f} Mbit/s; image "
              f"{bench.sizes['gzip'] / 1e6:.1f} MB gzip, {bench.sizes['esgz'] / 1e6:.1f} MB eStargz; "
              f"{args.runs} rounds")
        print(f"gzip index (`als index`, defaults): {bench.index['index_bytes'] / 1e3:.0f} kB for "
              f"{bench.index['layer_bytes'] / 1e6:.1f} MB of layer blobs, {100 * bench.index['fraction']:.2f}% "
              f"(target {bench.index['target']}: {'met' if bench.index['target_met'] else 'MISSED'}); "
              f"built in {bench.index['seconds']:.1f}s")
        for v in cols:
            print(f"  {v.name:<14}{v.label}")
        print_tables(series, cols, rows)
        print(f"\nJSON: {args.out}; {meta['seconds']['total']}s in all")
    finally:
        bench.close()
    return 0


def podman_version() -> str:
    done = subprocess.run(["podman", "--version"], capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
