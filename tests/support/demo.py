"""`make demo`: the main job end to end on this machine.

Starts a registry on 127.0.0.1, pushes a small Debian-python image as eStargz,
mounts the store with `als serve`, and runs `python3 -c 'print(1)'` in it with
Podman through the store, then reports how much of the image was fetched.
Everything it starts, it stops; everything it writes is in one temp dir.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from als.tools.image import estargz_layer, push_image
from als.reference import parse_reference
from als.registry.client import RegistryClient
from als.registry.sysregistries import RegistriesConf
from tests.support import images
from als.tools.podman import Podman
from tests.support.registry import RegistryProcess
from tests.support.store_process import StoreProcess, write_registries_conf


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chunk-size", type=int, default=1 << 20)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="als-demo-"))
    print(f"work directory: {work}")
    with RegistryProcess(work / "registry") as registry:
        conf = write_registries_conf(work / "registries.conf", [registry.host])
        ref = f"{registry.host}/demo/python:esgz"

        print("1. building a Debian python3 root file system and converting it to eStargz ...")
        rootfs = images.python_rootfs_tar()
        with open(rootfs, "rb") as f:
            layer = estargz_layer(f, chunk_size=args.chunk_size)
        with RegistryClient(RegistriesConf.load(str(conf))) as client:
            push_image(client, parse_reference(ref), [layer])
        print(f"   pushed {ref}: one layer, {mib(layer.size)} compressed")

        (work / "store-work").mkdir()
        # Background fetch off, so the figure below is what the container's reads fetched.
        with StoreProcess(work / "store-work", registries_conf=conf, log_level="info",
                          config="[fetch]\nbackground = false\n") as store:
            print(f"2. als serve is mounted at {store.mountpoint}")
            with Podman(work / "podman", additional_layer_store=store.mountpoint,
                        insecure_registries=[registry.host]) as podman:
                cmd = ["python3", "-c", "print(1)"]
                print(f"3. podman run {ref} {shlex.join(cmd)}")
                mark = registry.mark()
                t0 = time.monotonic()
                out = podman.run("run", "--rm", ref, *cmd).stdout.strip()
                elapsed = time.monotonic() - t0
                fetched = sum(a.written for a in registry.accesses_since(mark) if layer.digest in a.uri)
                print(f"   the container printed: {out!r} after {elapsed:.1f} s (pull included)")
                print(f"   layer bytes fetched from the registry: {mib(fetched)} of {mib(layer.size)} "
                      f"({100 * fetched / layer.size:.1f}% of the image)")
            print("4. store log (layer events):")
            for line in store.log().splitlines():
                if "als.store" in line:
                    print("   " + line.split(" als.store: ", 1)[-1])
        if out != "1":
            print("demo FAILED: the container did not print 1", file=sys.stderr)
            return 1
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print("demo OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
