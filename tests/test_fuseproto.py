"""What the FUSE protocol layer tells the kernel, seen through a real mount and the store's own counters.

Warm content must never reach the daemon: no open, flush or opendir messages,
pages, listings and symlinks cached by the kernel. Layers without xattrs are
served through the second mount the kernel never asks for xattrs; layers with
xattrs keep `diff` on the main mount, with their values as the image has them.
"""

from __future__ import annotations

import base64
import errno
import io
import os
import signal
import subprocess
import threading

import pytest

from als.image import estargz_layer, push_image
from als.reference import parse_reference
from tests.support import images
from tests.support.registry import free_port
from tests.support.store_process import StoreProcess, is_mounted
from tests.test_metrics import scrape_tcp, value

FILES = {f"app/dir{d}/f{i}.txt": f"file {d}/{i}\n".encode() * (i + 1) for d in range(3) for i in range(20)}
FILES["app/bin/tool"] = os.urandom(300 << 10)
OPS = ("open", "flush", "opendir", "read", "readdir", "readdirplus", "readlink", "getxattr", "lookup", "getattr")


@pytest.fixture(scope="module")
def port():
    return free_port()


@pytest.fixture(scope="module")
def store(registries_conf, tmp_path_factory, port):
    with StoreProcess(tmp_path_factory.mktemp("proto"), registries_conf=registries_conf,
                      config=f'[fetch]\nbackground = false\n[metrics]\naddress = "127.0.0.1:{port}"\n') as s:
        yield s


@pytest.fixture(scope="module")
def plain(registry, client):
    ref = f"{registry.host}/proto:plain"
    dirs = sorted({os.path.dirname(p) for p in FILES} | {"app"})
    entries = [images.Entry(d, images.DIR, 0o755) for d in dirs]
    entries += [images.Entry(p, images.FILE, 0o755 if p.endswith("tool") else 0o644, data=d) for p, d in FILES.items()]
    entries.append(images.Entry("app/link", images.SYMLINK, 0o777, link="dir0/f1.txt"))
    layer = estargz_layer(io.BytesIO(images.layer_tar(entries)), chunk_size=64 << 10)
    push_image(client, parse_reference(ref), [layer])
    return ref, layer


@pytest.fixture(scope="module")
def with_xattrs(registry, client):
    ref = f"{registry.host}/proto:xattrs"
    cap = bytes([1, 0, 0, 2, 0x20, 0, 0, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # binary, not text
    entries = [images.Entry("x", images.DIR, 0o755),
               images.Entry("x/capped", images.FILE, 0o755, data=b"#!/bin/sh\n", xattrs={"user.cap": cap}),
               images.Entry("x/plain", images.FILE, 0o644, data=b"plain\n")]
    layer = estargz_layer(io.BytesIO(images.layer_tar(entries)), chunk_size=64 << 10)
    push_image(client, parse_reference(ref), [layer])
    return ref, layer, cap


def counts(port: int) -> dict[str, float]:
    text = scrape_tcp(port)
    return {op: value(text, "als_fuse_operations_total", op=op) for op in OPS}


def walk_and_read(top) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(top):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                with open(p, "rb") as f:
                    out[os.path.relpath(p, top)] = f.read()
    return out


def test_warm_files_listings_and_links_never_reach_the_daemon(store, plain, port):
    ref, layer = plain
    diff = store.layer_dir(ref, layer.digest) / "diff"
    first = walk_and_read(diff)
    assert first == FILES
    assert os.readlink(diff / "app/link") == "dir0/f1.txt"
    before = counts(port)  # read-only mount: no access time to refresh after the cold reads either
    for _ in range(3):
        assert walk_and_read(diff) == FILES
        assert os.readlink(diff / "app/link") == "dir0/f1.txt"
    after = counts(port)
    moved = {op: after[op] - before[op] for op in OPS if after[op] != before[op]}
    assert moved == {}, moved  # opens, reads, listings, links, lookups: all answered by the kernel
    # each answered with ENOSYS once per mount (main and .noxattr): "no messages needed from now on"
    assert after["open"] <= 2 and after["opendir"] <= 2 and after["flush"] <= 2


def test_a_layer_without_xattrs_is_served_through_the_mount_that_has_none(store, plain):
    ref, layer = plain
    top = store.layer_dir(ref, layer.digest)
    b64 = base64.b64encode(ref.encode()).decode()
    assert os.readlink(top / "diff") == f"../../.noxattr/{b64}/{layer.digest}/diff"
    assert is_mounted(store.mountpoint / ".noxattr")
    assert os.path.isdir(top / "diff")  # what containers/storage checks: stat follows the link
    assert sorted(os.listdir(top)) == ["blob", "diff", "info"]
    f = top / "diff/app/dir1/f3.txt"
    assert f.read_bytes() == FILES["app/dir1/f3.txt"]
    assert os.listxattr(f) == []
    with pytest.raises(OSError) as e:
        os.getxattr(f, "trusted.overlay.metacopy")
    assert e.value.errno == errno.EOPNOTSUPP  # the kernel answered: the daemon is never asked


def test_a_layer_with_xattrs_keeps_diff_on_the_main_mount_with_exact_values(store, with_xattrs):
    ref, layer, cap = with_xattrs
    diff = store.layer_dir(ref, layer.digest) / "diff"
    assert not os.path.islink(diff) and os.path.isdir(diff)
    assert os.getxattr(diff / "x/capped", "user.cap") == cap  # bytes that are not text arrive intact
    assert os.listxattr(diff / "x/capped") == ["user.cap"]
    with pytest.raises(OSError) as e:
        os.getxattr(diff / "x/plain", "user.cap")
    assert e.value.errno == errno.ENODATA
    assert (diff / "x/plain").read_bytes() == b"plain\n"


def test_writes_are_refused_and_the_layer_is_unchanged(store, plain):
    ref, layer = plain
    f = store.layer_dir(ref, layer.digest) / "diff/app/dir0/f0.txt"
    for flags in (os.O_WRONLY, os.O_RDWR | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        try:
            fd = os.open(f, flags)
        except OSError as e:
            assert e.errno in (errno.EROFS, errno.EACCES), e
            continue
        try:  # a message-less open cannot refuse: the write itself is refused
            with pytest.raises(OSError) as e:
                os.write(fd, b"x")
            assert e.value.errno == errno.EROFS
        finally:
            os.close(fd)
    for call in (lambda: os.mkdir(f.parent / "new"), lambda: os.unlink(f), lambda: os.rename(f, f.parent / "g"),
                 lambda: os.symlink("x", f.parent / "s"), lambda: os.setxattr(f, "user.x", b"1")):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno in (errno.EROFS, errno.EOPNOTSUPP, errno.EPERM), e
    assert f.read_bytes() == FILES["app/dir0/f0.txt"]


def test_a_read_waiting_for_the_network_leaves_the_other_workers_answering(store, registry, client):
    """A stopped registry holds one read; lookups and cached reads on other workers still answer."""
    ref = f"{registry.host}/proto:slow"
    data = os.urandom(2 << 20)
    layer = images.push_files(client, ref, {"big.bin": data, "small.txt": b"small\n"}, chunk_size=256 << 10)
    diff = store.layer_dir(ref, layer.digest) / "diff"
    assert (diff / "small.txt").read_bytes() == b"small\n"
    os.kill(registry.proc.pid, signal.SIGSTOP)
    try:
        result = {}
        t = threading.Thread(target=lambda: result.update(big=(diff / "big.bin").read_bytes()), daemon=True)
        t.start()
        t.join(0.5)
        assert t.is_alive()  # waiting for the registry
        r = subprocess.run(["ls", "-la", f"{diff}/"], capture_output=True, text=True, timeout=10)
        assert "small.txt" in r.stdout
    finally:
        os.kill(registry.proc.pid, signal.SIGCONT)
    t.join(60)
    assert result.get("big") == data


def test_listings_the_kernel_caches_grow_with_the_images_looked_up(store, plain, registry, client):
    """Listings are cached by the kernel; the store tells it when an image or layer appears."""
    ref, layer = plain
    assert os.path.isdir(store.layer_dir(ref, layer.digest) / "diff")
    first = os.listdir(store.mountpoint)
    assert base64.b64encode(ref.encode()).decode() in first
    new_ref = f"{registry.host}/proto:listing"
    new = images.push_files(client, new_ref, {"a.txt": b"a\n"}, chunk_size=64 << 10)
    new_b64 = base64.b64encode(new_ref.encode()).decode()
    assert new_b64 not in first
    assert (store.layer_dir(new_ref, new.digest) / "diff/a.txt").read_bytes() == b"a\n"
    assert new_b64 in os.listdir(store.mountpoint)  # not the listing the kernel cached before
    assert os.listdir(store.mountpoint / new_b64) == [new.digest]


def test_a_small_files_miss_brings_the_small_files_after_it_in_its_directory(store, registry, client):
    """Interpreters load many small files of one directory in a row: one request serves them."""
    ref = f"{registry.host}/proto:pycache"
    small = {f"lib/pkg/m{i:02d}.pyc": os.urandom(3000) for i in range(12)}
    other = {"lib/zz/far.bin": os.urandom(2 << 20)}  # another directory: never brought along
    layer = images.push_files(client, ref, {**small, **other}, chunk_size=64 << 10)
    diff = store.layer_dir(ref, layer.digest) / "diff"
    assert os.path.isdir(diff)
    mark = registry.mark()
    assert (diff / "lib/pkg/m00.pyc").read_bytes() == small["lib/pkg/m00.pyc"]
    first = registry.accesses_since(mark)
    assert len([a for a in first if a.written]) == 1
    assert sum(a.written for a in first) < 1 << 20  # not the other directory's big file
    mark = registry.mark()
    for name, data in small.items():
        assert (diff / name).read_bytes() == data
    assert [a.uri for a in registry.accesses_since(mark) if a.written] == []  # all came with the first


def test_the_xattr_free_mount_is_read_only(store, plain):
    ref, layer = plain
    real = os.path.realpath(store.layer_dir(ref, layer.digest) / "diff")
    assert "/.noxattr/" in real
    assert os.statvfs(real).f_flag & os.ST_RDONLY
    with pytest.raises(OSError) as e:
        os.open(os.path.join(real, "app/dir0/f0.txt"), os.O_WRONLY)
    assert e.value.errno == errno.EROFS
