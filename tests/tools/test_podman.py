"""The test harness itself, against real Podman 4.3.1 and a real docker-registry:
als/tools/podman.py (isolated Podman) and tests/support/images.py (layers).

    python3 -m pytest tests/tools/test_podman.py -q -m slow
"""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from tests.support import images
from tests.support.images import BLOCK, CHAR, DIR, FILE, SYMLINK
from als.tools.podman import HOST_STATE_PATHS, Podman
from tests.support.registry import RegistryProcess


def _mounts() -> list[str]:
    with open("/proc/mounts") as f:
        return f.read().splitlines()


@pytest.fixture(scope="module")
def registry():
    reg = RegistryProcess()
    reg.start()
    try:
        yield reg
    finally:
        reg.cleanup()


@pytest.fixture
def make_podman(tmp_path):
    """Podman instances under tmp_path; all closed (and checked clean) at teardown."""
    made: list[Podman] = []

    def make(name: str = "podman", **kw) -> Podman:
        p = Podman(tmp_path / name, **kw)
        made.append(p)
        return p

    yield make
    problems = []
    for p in made:
        try:
            p.close()
        finally:
            if p.leftover_pids():
                problems.append(f"{p}: leftover processes {p.leftover_pids()}")
            if p.leftover_mounts():
                problems.append(f"{p}: leftover mounts {p.leftover_mounts()}")
    assert not problems, problems


def _check_listing(p: Podman, image: str) -> dict[str, images.Stat]:
    out = p.run_container(image, *images.tree_listing_command())
    got = images.parse_tree_listing(out)
    diff = images.diff_listings(images.expected_tree(), got)
    assert not diff, "\n".join(diff)
    return got


# ---------------------------------------------------------------- quick (no Podman)

def test_layers_are_deterministic():
    a, b = images.tree_image_layers(), images.tree_image_layers()
    assert [hashlib.sha256(x).digest() for x in a] == [hashlib.sha256(x).digest() for x in b]
    assert len(a) == 4


def test_expected_tree_semantics():
    exp = images.expected_tree()
    assert "gone" not in exp and "dir_gone" not in exp and "dir_gone/file" not in exp
    assert {p for p in exp if p.startswith("opq/")} == {"opq/new"}
    assert exp["reborn"].type == DIR and exp["reborn/again"].type == FILE
    assert exp["replaced_link"].type == FILE
    assert exp["hl_a"].nlink == exp["hl_b"].nlink == exp["dir/hl_c"].nlink == 3
    assert exp["setuid_link"].nlink == 2 and exp["setuid"].mode == 0o4755
    assert exp["chardev"].dev == (1, 3) and exp["blockdev"].dev == (7, 0)
    assert exp["big.bin"].size > 3 * images.CHUNK
    assert len(images.LONG_FILE) > 100
    assert images.tree_xattrs() == {"xattr_file": {"user.test": b"value"}, "xattr_dir": {"user.dir": b"d"}}


# ---------------------------------------------------------------- slow (real Podman)

@pytest.mark.slow
def test_python_rootfs_push_pull_run(registry, make_podman):
    t0 = time.monotonic()
    rootfs = images.python_rootfs_tar()
    t_build = time.monotonic() - t0
    ref = f"{registry.host}/als-test/python:3.11"

    builder = make_podman("builder", insecure_registries=[registry.host])
    builder.import_tar(rootfs, ref)
    builder.push(ref)

    fresh = make_podman("fresh", insecure_registries=[registry.host])
    assert not fresh.image_exists(ref)
    mark = registry.mark()
    t0 = time.monotonic()
    fresh.pull(ref)
    t_pull = time.monotonic() - t0
    served = sum(a.written for a in registry.accesses_since(mark)
                 if a.method == "GET" and "/blobs/" in a.uri)
    assert served > 5_000_000  # the whole compressed layer came from the registry

    t0 = time.monotonic()
    assert fresh.run_container(ref, "python3", "-c", "print(1)") == "1\n"
    t_run = time.monotonic() - t0
    out = fresh.run_container(ref, "python3", "-c",
                              "import hashlib, ssl, sqlite3, json; print(hashlib.sha256(b'').hexdigest()[:8])")
    assert out == "e3b0c442\n"
    assert fresh.run_container(ref, "sh", "-c", "ls /usr/bin/python3 && cat /etc/passwd | wc -l") \
        == "/usr/bin/python3\n2\n"
    print(f"\nrootfs {rootfs.stat().st_size >> 20} MiB (build/cached {t_build:.1f}s), "
          f"pull {served >> 20} MiB {t_pull:.1f}s, run {t_run:.2f}s")


@pytest.mark.slow
def test_tree_image_load_listing_push_pull(registry, make_podman, tmp_path):
    """Exact layer bytes via an oci-archive + `podman load`; the merged view in a
    container equals images.expected_tree(), also after push + pull elsewhere."""
    layers = images.tree_image_layers()
    archive = tmp_path / "tree.oci.tar"
    ref = f"{registry.host}/als-test/tree:1"
    images.oci_archive(layers, archive, ref_name=ref)

    p = make_podman("loader", insecure_registries=[registry.host])
    assert p.load(archive) == [ref]
    diff_ids = p.inspect_image(ref)["RootFS"]["Layers"]
    assert diff_ids == ["sha256:" + hashlib.sha256(l).hexdigest() for l in layers]  # exact bytes

    got = _check_listing(p, ref)
    # the specific entries the brief names, spelled out
    assert got["setuid"].mode == 0o4755 and got["setuid"].type == FILE
    assert got["hl_a"].nlink == 3 and got["hl_a"].group == got["dir/hl_c"].group == "dir/hl_c"
    assert got["setuid_link"].nlink == 2
    assert got["chardev"].type == CHAR and got["chardev"].dev == (1, 3)
    assert got["blockdev"].type == BLOCK and got["blockdev"].dev == (7, 0)
    assert "gone" not in got and "dir_gone" not in got
    assert sorted(k for k in got if k.startswith("opq/")) == ["opq/new"]
    assert got["link_abs"].type == SYMLINK and got["link_abs"].target == "/tree/small.txt"
    assert got["mtime_2100"].mtime == 4_102_444_800

    p.push(ref)
    q = make_podman("puller", insecure_registries=[registry.host])
    q.pull(ref)
    assert q.inspect_image(ref)["RootFS"]["Layers"] == diff_ids  # push/pull kept the layers
    _check_listing(q, ref)


@pytest.mark.slow
def test_tree_image_podman_build_add(make_podman, tmp_path):
    """`podman build` FROM scratch + one ADD per layer tar also gives the expected
    merged view: buildah extracts `.wh.*` entries as plain files and the commit
    diff emits them again under the same names, so they act as whiteouts in the
    image. But the layers are regenerated (other digests), unlike `podman load`."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    layers = images.tree_image_layers()
    for i, l in enumerate(layers):
        (ctx / f"l{i}.tar").write_bytes(l)
    (ctx / "Containerfile").write_text(
        "FROM scratch\n" + "".join(f"ADD l{i}.tar /\n" for i in range(len(layers))))
    p = make_podman("builder")
    p.run("build", "-t", "localhost/tree-build:1", str(ctx))
    diff_ids = p.inspect_image("localhost/tree-build:1")["RootFS"]["Layers"]
    assert len(diff_ids) == len(layers)
    _check_listing(p, "localhost/tree-build:1")


@pytest.mark.slow
def test_podman_isolation_and_cleanup(make_podman, tmp_path):
    """Nothing outside the work dir changes, no mount or process survives close()."""
    def host_state():
        return {t: sorted(os.listdir(t)) for t in [*HOST_STATE_PATHS, "/dev/shm"] if os.path.isdir(t)}

    mounts_before, state_before = _mounts(), host_state()
    als = tmp_path / "als-mnt"
    als.mkdir()
    p = make_podman("iso", additional_layer_store=als, partial_pulls=True,
                    insecure_registries=["127.0.0.1:1"])
    conf = p.storage_conf.read_text()
    assert f'additionallayerstores = ["{als}:ref"]' in conf
    assert 'enable_partial_images = "true"' in conf
    assert "127.0.0.1:1" in p.registries_conf.read_text()
    info = p.run("info", "--format", "{{.Store.GraphRoot}} {{json .Store.GraphOptions}} "
                 "{{.Host.OCIRuntime.Name}}").stdout
    assert str(p.graphroot) in info and f"{als}:ref" in info and "runc" in info

    tar = tmp_path / "busybox.tar"
    tar.write_bytes(images.busybox_layer())
    p.import_tar(tar, "localhost/bb:1")
    assert p.run_container("localhost/bb:1", "sh", "-c", "ulimit -n; echo ok") == "1024\nok\n"
    # a container's rootfs mount lives in the command's own mount namespace
    assert _mounts() == mounts_before
    assert host_state() == state_before
    assert p.leftover_pids() == []
    p.close()
    assert not any((tmp_path / "iso").iterdir())
    assert _mounts() == mounts_before and host_state() == state_before

    with pytest.raises(FileNotFoundError):
        Podman(tmp_path / "bad", additional_layer_store=tmp_path / "missing")
