"""What the FUSE protocol layer tells the kernel, seen through a real mount and the store's own counters.

Warm content must never reach the daemon: no open, flush or opendir messages,
pages, listings and symlinks cached by the kernel. Layers without xattrs are
served through the second mount the kernel never asks for xattrs; layers with
xattrs keep `diff` on the main mount, with their values as the image has them.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from als.fuse import abi
from als.fuse.session import Session, WouldBlock
from als.tools.image import estargz_layer, push_image
from als.reference import parse_reference
from tests.support import faultproxy as fp
from tests.support import images
from tests.support.registry import free_port
from tests.support.store_process import StoreProcess, is_mounted, write_registries_conf
from tests.support.scrape import scrape_tcp, value

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


# ---- large directories, old times, interrupts, waiting requests, a lost mount ------------------
def bounded(cmd: list[str], timeout: float) -> subprocess.CompletedProcess | None:
    """Run ``cmd``; None if it is still running after ``timeout`` (a reader stuck in the kernel cannot
    be reaped until the store lets go of its request, so it is left for the store's teardown)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        return None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def test_a_directory_of_thousands_of_names_lists_whole(store, registry, client):
    """Since Linux 6.16 a listing reply follows the reader's buffer (32 KiB for glibc): thousands of
    entries in one reply, more buffers than one writev may take. Every reply must arrive whole."""
    ref = f"{registry.host}/proto:wide"
    names = [f"f{i:04d}" for i in range(6000)]  # 8-byte names: the most entries per reply
    entries = [images.Entry("w", images.DIR, 0o755)] + [images.Entry(f"w/{n}", images.FILE, data=b"")
                                                      for n in names]
    layer = estargz_layer(io.BytesIO(images.layer_tar(entries)), chunk_size=64 << 10)
    push_image(client, parse_reference(ref), [layer])
    wide = store.layer_dir(ref, layer.digest) / "diff/w"
    r = bounded(["ls", "-f", str(wide)], 60)
    assert r is not None, "ls of a large directory hung"
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.decode().split()) == sorted(names + [".", ".."])
    with os.scandir(wide) as it:  # readdirplus: every entry looked up in the same replies
        inodes = {e.name: e.inode() for e in it}
    assert sorted(inodes) == names
    assert all(os.lstat(wide / n).st_ino == ino for n, ino in list(inodes.items())[::500])


def test_times_before_1970_list_and_stat_signed(store, registry, client):
    ref = f"{registry.host}/proto:old"
    then = -86400 * 365 * 20 - 7  # 1950
    entries = [images.Entry("old", images.DIR, 0o755, mtime=then),
               images.Entry("old/moon", images.FILE, data=b"1969\n", mtime=-14182940),
               images.Entry("old/new", images.FILE, data=b"now\n")]
    layer = estargz_layer(io.BytesIO(images.layer_tar(entries)), chunk_size=64 << 10)
    push_image(client, parse_reference(ref), [layer])
    old = store.layer_dir(ref, layer.digest) / "diff/old"
    assert sorted(os.listdir(old)) == ["moon", "new"]  # not EIO for the whole directory
    assert os.stat(old / "moon").st_mtime == -14182940
    assert os.stat(old).st_mtime == then
    assert os.stat(old / "new").st_mtime == images.EPOCH


def test_a_files_nanoseconds_reach_stat():
    """eStargz writers round to seconds, zstd:chunked keeps nanoseconds (RFC 3339 with a fraction)."""
    from als.formats import tocentries
    from als.fuse.filesystem import node_attr
    from als.layer.view import LayerView
    e = tocentries.toc_entry({"name": "f", "type": "reg", "size": 0, "modtime": "1969-07-20T20:17:40.123456789Z"}, 0)
    assert (e.mtime, e.mtime_nsec) == (-14182940, 123456789)
    node = LayerView([e]).lookup(["f"])
    st = abi.ATTR.unpack(node_attr(node).pack())
    assert st[4] == -14182940 and st[7] == 123456789  # mtime and its nanoseconds, signed


@pytest.fixture(scope="module")
def stalling(registry):
    with fp.FaultProxy(registry.host) as p:
        yield p


@pytest.fixture(scope="module")
def patient(registry, stalling, tmp_path_factory):
    """A store with long deadlines, so that a stalled registry holds its requests for long."""
    conf = write_registries_conf(tmp_path_factory.mktemp("conf") / "registries.conf", [registry.host, stalling.host])
    with StoreProcess(tmp_path_factory.mktemp("patient"), registries_conf=conf,
                      config="[fetch]\nbackground = false\npredict = false\n[resolve]\ntimeout = 30\n"
                             "tail_size = 4096\n[registry]\nread_timeout = 40\nrequest_deadline = 60\n") as s:
        yield s


def test_a_killed_reader_waiting_for_the_registry_is_released_at_once(patient, registry, client, stalling):
    """SIGKILL of a reader whose request waits for a stalled registry: the kernel interrupts the request,
    the store answers EINTR at once, and the process is reaped (not after the request deadline)."""
    ref = f"{stalling.host}/proto:interrupt"
    data = os.urandom(1 << 20)
    layer = images.push_files(client, ref.replace(stalling.host, registry.host), {"big.bin": data},
                              chunk_size=256 << 10)
    diff = patient.layer_dir(ref, layer.digest) / "diff"
    assert os.path.isdir(diff)  # resolved while the proxy passes
    stalling.set(fp.STALL)
    try:
        reader = subprocess.Popen([sys.executable, "-c", READ_DIRECT, str(diff / "big.bin")])
        time.sleep(1.0)  # its read reaches the store and waits for the registry
        assert reader.poll() is None, "the read did not wait for the stalled registry"
        t0 = time.monotonic()
        reader.kill()
        try:
            reader.wait(timeout=15)  # the request deadline is 60 s
        except subprocess.TimeoutExpired:
            raise AssertionError("a killed reader was not released while its read waited") from None
        waited = time.monotonic() - t0
    finally:
        stalling.set(fp.PASS)
    print(f"\nkilled reader reaped {waited:.2f}s after SIGKILL")
    assert (diff / "big.bin").read_bytes() == data  # and the store still serves the file whole


READ_DIRECT = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 1 << 20)
os.preadv(fd, [buf], 512 << 10)
"""


def test_lookups_waiting_for_a_resolve_leave_readers_for_everything_else(patient, registry, client, stalling):
    """Far more cold lookups than reader threads wait on a stalled registry; a resolved layer's
    files, listings and `info` on the same mount still answer while they wait."""
    ok_ref = f"{registry.host}/proto:meanwhile"
    ok = images.push_files(client, ok_ref, {"a.txt": b"a\n", "d/b.txt": b"b\n"}, chunk_size=64 << 10)
    ok_top = patient.layer_dir(ok_ref, ok.digest)
    assert os.path.isdir(ok_top / "diff")
    stuck_ref = f"{stalling.host}/proto:stuck"
    images.push_files(client, stuck_ref.replace(stalling.host, registry.host), {"x": b"x"}, chunk_size=64 << 10)
    stalling.set(fp.STALL)
    waiting = []
    try:
        for i in range(40):  # distinct names: the kernel sends one lookup for each
            digest = "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()
            t = threading.Thread(target=lambda d=digest: os.path.exists(patient.layer_dir(stuck_ref, d)),
                                 daemon=True)
            t.start()
            waiting.append(t)
        time.sleep(1.0)
        assert all(t.is_alive() for t in waiting), "the cold lookups did not wait for the registry"
        r = bounded(["sh", "-c", f"cat {ok_top}/info && ls {ok_top} && cat {ok_top}/diff/d/b.txt"], 20)
        still = sum(t.is_alive() for t in waiting)
    finally:
        stalling.set(fp.PASS)
    assert r is not None and r.returncode == 0, r
    assert b'"diff-digest"' in r.stdout and b"b\n" in r.stdout
    assert still == len(waiting), "answered only after the stalled lookups gave up"
    for t in waiting:
        t.join(40)
    assert not any(t.is_alive() for t in waiting)


def test_a_mount_removed_from_outside_makes_the_store_exit_with_an_error(registries_conf, tmp_path):
    with StoreProcess(tmp_path, registries_conf=registries_conf) as s:
        subprocess.run(["umount", "-l", str(s.mountpoint)], check=True, timeout=30)
        try:
            code = s.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError("the store kept running without its mount") from None
        assert code != 0
        assert "was removed while serving" in s.log()


# ---- the protocol over a socket standing in for the kernel ----------------------------------------
class FakeKernel:
    """The kernel's side of a FUSE connection, over a SOCK_SEQPACKET pair (one message per request)."""

    def __init__(self, ops, **kw):
        self.kernel, self._daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.session = Session(self._daemon.fileno(), ops, **kw).start()
        self.unique = 0

    def send(self, opcode: int, nodeid: int = 1, body: bytes = b"", unique: int | None = None) -> int:
        if unique is None:
            self.unique += 2
            unique = self.unique
        self.kernel.send(abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), opcode, unique, nodeid,
                                                  0, 0, 4242, 0, 0) + body)
        return unique

    def reply(self, timeout: float = 10.0) -> tuple[int, int, bytes]:
        """(unique, errno, payload) of the next reply."""
        self.kernel.settimeout(timeout)
        data = self.kernel.recv(4 << 20)
        length, err, unique = abi.OUT_HEADER.unpack_from(data)
        assert length == len(data)
        return unique, -err, data[abi.OUT_HEADER.size:]

    def close(self) -> None:
        self.kernel.close()
        self.session.finished.wait(10)
        self._daemon.close()


class Ops:
    """Operations for the fake kernel: lookups wait for ``gate`` once they may, forgets are recorded."""

    def __init__(self):
        self.gate = threading.Event()
        self.forgot: list[tuple[int, int]] = []
        self.fail_forget = False
        self.entries: list[tuple[bytes, int, int]] = []

    def lookup(self, parent, name, req):
        if name.startswith(b"slow"):
            if not req.can_wait:
                raise WouldBlock
            self.gate.wait(10)
        return abi.Entry(7, abi.Attr(7, 0o100644), 1.0, 1.0)

    def forget(self, nodeid, count):
        self.forgot.append((nodeid, count))
        if self.fail_forget:
            raise RuntimeError("a bug in forget")

    def getattr(self, nodeid):
        return abi.Attr(nodeid, 0o40755, mtime=-1), 1.0

    def listing(self, nodeid):
        return self.entries

    def error(self, op, nodeid, exc):
        return errno.EIO


@pytest.fixture
def kernel():
    made = []

    def make(ops, **kw):
        made.append(FakeKernel(ops, **kw))
        return made[-1]
    yield make
    for k in made:
        k.close()


def init_body(minor: int) -> bytes:
    return abi.INIT_IN.pack(7, minor, 128 << 10, 0xFFFFFFFF)


def test_init_refuses_a_kernel_older_than_the_protocol_needs(kernel):
    k = kernel(Ops(), workers=1)
    u = k.send(abi.INIT, body=init_body(abi.MIN_MINOR - 1))
    assert k.reply()[:2] == (u, errno.EPROTO)
    assert f"7.{abi.MIN_MINOR - 1}" in k.session.refused and not k.session.initialized.is_set()
    k2 = kernel(Ops(), workers=1)
    u = k2.send(abi.INIT, body=init_body(40))
    unique, err, payload = k2.reply()
    assert (unique, err) == (u, 0) and abi.INIT_OUT.unpack(payload)[:2] == (7, abi.MINOR)


def test_a_failing_forget_or_observer_costs_no_reader_and_no_reply(kernel):
    ops = Ops()
    ops.fail_forget = True
    k = kernel(ops, workers=1, observe=lambda op, err: 1 / 0)  # one reader: if it died, nothing answers
    k.send(abi.FORGET, nodeid=9, body=abi.FORGET_IN.pack(1))
    k.send(abi.BATCH_FORGET, body=struct.pack("<II", 2, 0) + abi.FORGET_ONE.pack(3, 1)
           + abi.FORGET_ONE.pack(4, 2))
    for _ in range(2):
        u = k.send(abi.GETATTR, nodeid=5, body=bytes(16))
        unique, err, payload = k.reply()
        assert (unique, err) == (u, 0)
        assert abi.ATTR.unpack_from(payload, abi.ATTR_HEAD.size)[4] == -1  # a signed time
    assert (9, 1) in ops.forgot and (3, 1) in ops.forgot


def test_a_listing_of_thousands_of_entries_is_one_whole_reply(kernel):
    ops = Ops()
    ops.entries = [(b".", 1, 0o40000), (b"..", 1, 0o40000)] + [(b"f%04d" % i, 100 + i, 0o100644)
                                                               for i in range(5000)]
    k = kernel(ops, workers=1)
    u = k.send(abi.READDIR, body=abi.READ_IN.pack(0, 0, 1 << 20) + bytes(16))
    unique, err, payload = k.reply()
    assert (unique, err) == (u, 0)
    names, pos = [], 0
    while pos < len(payload):
        ino, off, namelen, _ = abi.DIRENT.unpack_from(payload, pos)
        names.append(payload[pos + abi.DIRENT.size:pos + abi.DIRENT.size + namelen])
        pos += (abi.DIRENT.size + namelen + 7) & ~7
    assert names == [e[0] for e in ops.entries]
    u = k.send(abi.READDIR, body=abi.READ_IN.pack(0, 4000, 4096) + bytes(16))  # from an offset
    unique, err, payload = k.reply()
    assert (unique, err) == (u, 0)
    assert abi.DIRENT.unpack_from(payload)[:2] == (100 + 3998, 4001)


def test_waiting_requests_leave_the_readers_free_and_an_interrupt_ends_one_at_once(kernel):
    ops = Ops()
    k = kernel(ops, workers=1, waiting=4)
    slow = [k.send(abi.LOOKUP, body=b"slow%d\0" % i) for i in range(3)]
    u = k.send(abi.GETATTR, nodeid=3, body=bytes(16))
    assert k.reply()[:2] == (u, 0)  # the only reader answered while three lookups wait
    k.send(abi.INTERRUPT, unique=slow[0] | 1, body=struct.pack("<Q", slow[0]))
    assert k.reply()[:2] == (slow[0], errno.EINTR)
    unknown = k.send(abi.INTERRUPT, unique=(k.unique + 2) | 1, body=struct.pack("<Q", 999998))
    assert k.reply()[:2] == (unknown, errno.EAGAIN)  # not waiting here: the kernel asks again later
    ops.gate.set()
    answered = {k.reply()[0] for _ in range(2)}
    assert answered == set(slow[1:])
    # the interrupted lookup's entry never reached the kernel: its reference is dropped
    deadline = time.monotonic() + 10
    while (7, 1) not in ops.forgot and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ops.forgot == [(7, 1)]


def test_an_evicted_layer_is_let_go_by_the_kernel_and_served_again(registries_conf, registry, client, tmp_path):
    """With one unused layer kept, resolving a second evicts the first: the kernel is told to drop its
    names (it asks again, where it would otherwise answer from its cache for an hour), and the next
    lookup rebuilds it from saved metadata and serves the same bytes."""
    port = free_port()
    refs = [f"{registry.host}/proto:evict{i}" for i in range(2)]
    layers = [images.push_files(client, ref, {"f.txt": ref.encode()}, chunk_size=64 << 10) for ref in refs]
    with StoreProcess(tmp_path, registries_conf=registries_conf,
                      config=f'[resolve]\nmax_idle_layers = 1\n[fetch]\nbackground = false\n'
                             f'[metrics]\naddress = "127.0.0.1:{port}"\n') as s:
        first = s.layer_dir(refs[0], layers[0].digest)
        assert (first / "diff/f.txt").read_bytes() == refs[0].encode()
        assert (first / "info").exists()
        lookups = counts(port)["lookup"]
        assert (first / "info").exists()
        assert counts(port)["lookup"] == lookups  # cached by the kernel
        assert (s.layer_dir(refs[1], layers[1].digest) / "diff/f.txt").read_bytes() == refs[1].encode()
        deadline = time.monotonic() + 10
        while "dropped from memory" not in s.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert f"layer {layers[0].digest}: dropped from memory" in s.log()
        time.sleep(0.5)  # the notification goes out from a thread of its own
        lookups = counts(port)["lookup"]
        assert (first / "info").exists()
        assert counts(port)["lookup"] > lookups  # the kernel let go of the evicted layer's names
        assert (first / "diff/f.txt").read_bytes() == refs[0].encode()
