"""The store crashes and comes back: every image that uses its layers works again, unaided.

containers/storage writes `<mount>/<base64 ref>/<digest>/diff` into the graph
root for good, so after `kill -9` and a restart on the same mount point the
restarted store must answer those paths again: new containers start (reading
files never read before), stopped containers start again, `podman save` and
`podman push` work, chunks already fetched come from the cache, and with the
registry down layers are rebuilt from the saved manifest, config and TOC.

Real Podman (pid_namespace=False so that `podman start` keeps its container)
and a registry of this test's own, which it stops.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.support import images
from tests.support.registry import RegistryProcess
from tests.support.restart import podman_on, push_tree
from tests.support.store_process import StoreProcess, is_mounted, write_registries_conf

pytestmark = pytest.mark.slow

NO_BACKGROUND = "[fetch]\nbackground = false\n"  # so that "never read" stays true until a container reads it
# What happens where the connection cannot be kept (tests/fuse/test_takeover.py: where it can).
NO_BACKGROUND += "[fuse]\nkeep_connection = false\n"


def served(registry, mark, digest) -> int:
    return sum(a.written for a in registry.accesses_since(mark) if a.uri.endswith(digest))


def raw(podman, *args) -> tuple[int, str]:
    """``podman ARGS`` without the harness's check that the store is mounted: (status, stderr)."""
    p = podman.popen(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        podman._kill_group(p)
        p.communicate()
        raise
    return p.returncode, err


def test_a_killed_store_restarts_and_every_image_works_again(tmp_path):
    expected = images.expected_tree()
    with RegistryProcess(tmp_path / "registry") as registry:
        conf = write_registries_conf(tmp_path / "registries.conf", [registry.host])
        ref, layers = push_tree(registry, conf, "restart/tree:esgz", 256 << 10, images.tree_image_layers, retries=1)
        tree1, tree3 = layers[1], layers[3]  # /tree/small.txt is in the first, /tree/new_in_3 in the last

        (tmp_path / "store").mkdir()
        store = StoreProcess(tmp_path / "store", registries_conf=conf, config=NO_BACKGROUND)
        store.start()
        try:
            with podman_on(store, tmp_path / "podman", registry) as podman:
                mark = registry.mark()
                podman.pull(ref)
                out = podman.run("run", "--name", "keep", ref, "cat", "/tree/small.txt").stdout
                assert out == "hello, tree\n"
                assert served(registry, mark, tree1.digest) < tree1.size  # lazily: only the chunks read
                assert served(registry, mark, tree3.digest) < tree3.size / 2

                # ---- crash: SIGKILL leaves a dead FUSE mount behind ----------------------------
                store.kill()
                assert is_mounted(store.mountpoint)
                # Meanwhile: listing still works (the kernel answers the mount point's stat from its
                # attribute cache), and a container of the image fails at once, saying why; no hang.
                assert raw(podman, "images")[0] == 0
                t0 = time.monotonic()
                rc, err = raw(podman, "run", "--rm", ref, "true")
                assert rc != 0 and "transport endpoint is not connected" in err, err
                assert time.monotonic() - t0 < 30

                # ---- restart on the same mount point ---------------------------------------------
                store.start()
                assert "clearing the stale mount" in store.log()

                mark = registry.mark()
                out = podman.run("run", "--rm", ref, "sha256sum", "/tree/new_in_3").stdout
                assert out.split()[0] == expected["new_in_3"].sha256  # never read before the crash
                assert 0 < served(registry, mark, tree3.digest) < tree3.size  # fetched lazily now

                mark = registry.mark()
                assert podman.run("run", "--rm", ref, "cat", "/tree/small.txt").stdout == "hello, tree\n"
                assert served(registry, mark, tree1.digest) == 0  # from the cache, TOC from the state dir

                # A container stopped before the crash starts again.
                assert podman.run("start", "--attach", "keep").stdout == "hello, tree\n"

                # save and push read `blob` through the restarted store.
                archive = tmp_path / "saved.tar"
                podman.run("save", "--format", "oci-archive", "-o", str(archive), ref)
                assert archive.stat().st_size > sum(l.size for l in layers) / 2
                podman.push(ref, f"{registry.host}/restart/pushed:1")

                # ---- crash again, and the registry is gone too -----------------------------------
                store.kill()
                # What the unit's ExecStopPost does: the mount point is a plain directory again.
                subprocess.run(["umount", "--lazy", str(store.mountpoint)], check=True, timeout=30)
                rc, err = raw(podman, "start", "--attach", "keep")
                assert rc != 0 and "no such file or directory" in err, err
                registry.stop()
                store.start()
                assert store.log().count("clearing the stale mount") == 1  # only the first time
                out = podman.run("run", "--rm", ref, "cat", "/tree/small.txt").stdout
                assert out == "hello, tree\n"  # cached chunks, layers rebuilt from saved metadata
                assert "serving it from saved metadata" in store.log()
                assert podman.run("start", "--attach", "keep").stdout == "hello, tree\n"
        finally:
            store.stop()
    assert not is_mounted(store.mountpoint)
