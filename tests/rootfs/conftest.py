"""What the `als mount` tests share: a tree image with a config, a store, and `als mount` run as a user does."""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from als.reference import parse_reference
from als.tools.image import estargz_layer, image_config, push_image
from tests.support import images
from tests.support.store_process import REPO, StoreProcess

# The image's config: what `als mount --print-args` must carry over to `podman run --rootfs`.
CMD = "id; pwd; env | grep -v -e ^HOSTNAME= -e ^TERM= | sort"
CONFIG = {"Entrypoint": ["/bin/sh", "-c"], "Cmd": [CMD], "WorkingDir": "/tree", "User": "1000:1000",
          "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "FOO=bar baz"]}


def push_tree(client, ref: str):
    """The tree image (busybox, then layers with whiteouts and an opaque dir) as eStargz, with CONFIG."""
    layers = [estargz_layer(io.BytesIO(t), chunk_size=256 << 10) for t in images.tree_image_layers()]
    cfg = json.loads(image_config(layers))
    cfg["config"].update(CONFIG)
    push_image(client, parse_reference(ref), layers, json.dumps(cfg, sort_keys=True).encode())
    return layers


@pytest.fixture(scope="module")
def tree(registry, client):
    ref = f"{registry.host}/rootfs/tree:esgz"
    return ref, push_tree(client, ref)


@pytest.fixture(scope="module")
def rootfs_store(registries_conf, tmp_path_factory):
    with StoreProcess(tmp_path_factory.mktemp("als"), registries_conf=registries_conf,
                      config="[fetch]\nbackground = false\n") as s:
        yield s


def als(store: StoreProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`als COMMAND --root <the store's> ARGS`, as a user runs it."""
    res = subprocess.run([sys.executable, "-m", "als", args[0], "--root", str(store.root), *args[1:]],
                         env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    if check and res.returncode != 0:
        raise AssertionError(f"als {' '.join(args)} exited {res.returncode}: {res.stderr[-3000:]}")
    return res


def is_mount_point(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


class Rootfs:
    """An image mounted with `als mount --print-args` on ``dir``; ``args`` as `mapfile -t` reads them."""

    def __init__(self, store: StoreProcess, ref: str, dir: Path):
        self.store, self.ref, self.dir = store, ref, dir
        dir.mkdir(parents=True, exist_ok=True)
        self.printed = als(store, "mount", "--print-args", ref, str(dir)).stdout
        self.args = self.printed.splitlines()

    def close(self) -> None:
        if is_mount_point(self.dir):
            als(self.store, "umount", "--force", str(self.dir), check=False)
        if is_mount_point(self.dir):
            subprocess.run(["umount", "-l", str(self.dir)], capture_output=True, timeout=30)


@pytest.fixture
def mounted(rootfs_store, tree, tmp_path):
    r = Rootfs(rootfs_store, tree[0], tmp_path / "rootfs")
    try:
        yield r
    finally:
        r.close()


def served(registry, mark: int, digests) -> int:
    """Blob bytes the registry sent since ``mark`` for these layers."""
    return sum(a.written for a in registry.accesses_since(mark) if a.method == "GET"
               and any(a.uri.endswith(d) for d in digests))


def listing(podman, *run_args) -> dict:
    return images.parse_tree_listing(podman.run("run", "--rm", *run_args, *images.tree_listing_command()).stdout)


def start_containers(podman, rootfs, scripts: list[str]) -> list[subprocess.Popen]:
    """``podman run --rootfs ROOTFS:O sh -c SCRIPT`` for each script, once each has printed "started"."""
    procs = [podman.popen("run", "--rm", "--rootfs", f"{rootfs}:O", "/bin/sh", "-c", f"{script}",
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) for script in scripts]
    for p in procs:
        line = b""
        deadline = time.monotonic() + 120
        while not line.endswith(b"\n") and time.monotonic() < deadline and p.poll() is None:
            if select.select([p.stdout], [], [], 1.0)[0]:
                line += os.read(p.stdout.fileno(), 1)
        assert line == b"started\n", (line, p.poll())
    return procs


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        outs.append(out.decode())
    return outs
