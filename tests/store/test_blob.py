"""`blob` through a real `als serve` mount and a real registry: no byte leaves unverified.

The kernel reads `blob` in whatever order its read-ahead and the reader's
threads produce (page-cache reads reach the daemon out of order), so every
read pattern is tried against a tampered blob (its eStargz TOC still
verifies, so the layer resolves; only the blob's digest fails) and must fail
with EIO without a single byte, and against an honest blob, where it must
return exactly the registry's bytes. A download that dies, or whose reader
goes away, must leave no read hanging and no spool file behind.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import logging
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from als.store.blob import RANGE, BlobReader
from als.config import Config
from als.ops.daemon import build_store
from als.errors import Interrupted
from tests.support import faultproxy as fp
from tests.support import images
from tests.support.store_process import write_registries_conf

CHUNK = 256 << 10
SIZE = 3 << 20  # uncompressible: the blob is a little larger
LIVENESS = 120.0  # seconds after which a read is taken to hang (a bound, not a measurement)
THREADS = 8
REFUSED = "blob does not match its digest; refusing to export it"


def push(registry, client, name: str, size: int = SIZE, host: str | None = None):
    """A fresh one-file eStargz image (random content: nothing of it is cached or shared)."""
    layer = images.push_files(client, f"{registry.host}/{name}:esgz", {name: os.urandom(size)},
                              chunk_size=CHUNK, level=1)
    layer.blob.seek(0)
    return f"{host or registry.host}/{name}:esgz", layer, layer.blob.read()


def tamper(registry, layer, at: int) -> None:
    """Flip a byte of the blob in the registry's storage, inside a chunk: the TOC at the end still verifies."""
    h = layer.digest.split(":")[1]
    path = registry.root / "data" / "docker/registry/v2/blobs/sha256" / h[:2] / h / "data"
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def bounded(fn, *args):
    """``fn(*args)`` in a thread, its result or exception; fails the test if it has not returned in time."""
    out: list = []

    def run():
        try:
            out.append(("ok", fn(*args)))
        except BaseException as e:  # handed to the test as it is
            out.append(("err", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(LIVENESS)
    assert out, f"{fn.__name__} did not return within {LIVENESS:g}s: it hangs"
    kind, value = out[0]
    if kind == "err":
        raise value
    return value


def read_sequential(path: Path) -> bytes:
    """read() from 0 to the end through the page cache: the kernel's read-ahead reaches the store out of order."""
    out = bytearray()
    with open(path, "rb", buffering=0) as f:
        while piece := f.read(128 << 10):
            out += piece
    return bytes(out)


def read_direct(path: Path, spans: list[tuple[int, int]]) -> list[bytes]:
    """O_DIRECT reads of (offset, length), in the order given: each one reaches the store as asked."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        out = []
        for offset, length in spans:
            buf = mmap.mmap(-1, length)  # page-aligned
            n = os.preadv(fd, [buf], offset)
            out.append(bytes(buf[:n]))
            buf.close()
        return out
    finally:
        os.close(fd)


def out_of_order_spans(size: int) -> list[tuple[int, int]]:
    """256 KiB at 256 KiB first, then the start, then the rest in order: together, the whole blob."""
    spans = [(256 << 10, 256 << 10), (0, 256 << 10)]
    spans += [(o, min(1 << 20, size - o)) for o in range(512 << 10, size, 1 << 20)]
    return spans


def read_in_threads(path: Path, size: int) -> list:
    """THREADS threads at once, each reading its own slice through the page cache; bytes or the OSError."""
    step = -(-size // THREADS)
    start = threading.Barrier(THREADS)

    def one(i: int):
        start.wait(LIVENESS)
        try:
            with open(path, "rb", buffering=0) as f:
                f.seek(i * step)
                out = bytearray()
                while len(out) < step and (piece := f.read(min(64 << 10, step - len(out)))):
                    out += piece
                return bytes(out)
        except OSError as e:
            return e

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(one, range(THREADS)))


def blob_path(store, ref: str, layer) -> Path:
    path = store.layer_dir(ref, layer.digest) / "blob"
    assert path.stat().st_size == layer.size  # resolved from its (honest) TOC
    return path


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---- a tampered blob: EIO, and not one byte ---------------------------------------------------
@pytest.fixture
def tampered(store, registry, client, request):
    ref, layer, raw = push(registry, client, request.node.name[5:40].replace("_", "-").strip("-"))
    tamper(registry, layer, len(raw) // 2)  # well inside the data, far from the TOC at the end
    return blob_path(store, ref, layer)


def test_a_tampered_blob_read_in_order_through_the_page_cache_fails_at_once(store, tampered):
    with open(tampered, "rb", buffering=0) as f:
        with pytest.raises(OSError) as e:
            bounded(f.read, 128 << 10)  # the very first read: not a byte before the whole blob is checked
        assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:
        bounded(read_sequential, tampered)
    assert e.value.errno == errno.EIO
    assert REFUSED in store.log()


def test_a_tampered_blob_read_out_of_order_with_o_direct_fails_every_read(store, tampered):
    for span in out_of_order_spans(tampered.stat().st_size)[:3]:
        with pytest.raises(OSError) as e:
            bounded(read_direct, tampered, [span])
        assert e.value.errno == errno.EIO, span


def test_a_tampered_blob_read_from_several_threads_at_once_fails_in_every_thread(store, tampered):
    results = bounded(read_in_threads, tampered, tampered.stat().st_size)
    assert [getattr(r, "errno", r) for r in results] == [errno.EIO] * THREADS


# ---- an honest blob: exactly the registry's bytes, whatever the pattern ------------------------
def test_an_honest_blob_read_through_the_page_cache_is_the_registry_blob(store, registry, client):
    ref, layer, raw = push(registry, client, "honest-seq", size=RANGE + (1 << 20))  # more than one range
    got = bounded(read_sequential, blob_path(store, ref, layer))
    assert len(got) == layer.size and sha(got) == layer.digest == sha(raw)


def test_an_honest_blob_read_out_of_order_with_o_direct_is_the_registry_blob(store, registry, client):
    ref, layer, raw = push(registry, client, "honest-direct")
    spans = out_of_order_spans(layer.size)
    pieces = bounded(read_direct, blob_path(store, ref, layer), spans)
    for (offset, length), piece in zip(spans, pieces):
        assert piece == raw[offset:offset + length], offset
    whole = b"".join(p for _, p in sorted(zip([o for o, _ in spans], pieces)))
    assert sha(whole) == layer.digest
    assert read_direct(blob_path(store, ref, layer), [(layer.size, 4096)]) == [b""]  # past the end


def test_an_honest_blob_read_from_several_threads_is_downloaded_once(store, registry, client):
    ref, layer, raw = push(registry, client, "honest-threads")
    path = blob_path(store, ref, layer)
    mark = registry.mark()
    results = bounded(read_in_threads, path, layer.size)
    assert sha(b"".join(results)) == layer.digest
    fetched = sum(a.written for a in registry.accesses_since(mark) if a.uri.endswith(layer.digest))
    assert fetched == layer.size  # one download, shared by every thread


# ---- downloads that die or are abandoned ------------------------------------------------------
FAULT_CONFIG = """
[registry]
connect_timeout = 1.0
read_timeout = 1.0
retries = 2
request_deadline = 60.0
[fetch]
background = false
"""


@pytest.fixture(scope="module")
def proxy(registry):
    with fp.FaultProxy(registry.host, trickle_interval=0.05) as p:
        yield p


@pytest.fixture
def healthy_again(proxy, registry):
    with fp.healthy_around(proxy, registry):
        yield


@pytest.fixture(scope="module")
def proxied_store(registry, proxy, tmp_path_factory):
    with fp.store_behind(proxy, registry, tmp_path_factory.mktemp("blob-faults"), FAULT_CONFIG) as s:
        yield s


def wait_until(check, what: str) -> None:
    done = threading.Event()
    for _ in range(int(LIVENESS / 0.05)):
        if check():
            return
        done.wait(0.05)
    raise AssertionError(f"{what}: not within {LIVENESS:g}s")


def spool_files(pid: int | str, root: Path) -> list[str]:
    """The open files of process ``pid`` in the store's cache directory: blob spools."""
    fds = Path(f"/proc/{pid}/fd")
    out = []
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(root / "cache") + "/") and target.endswith(" (deleted)"):
            out.append(target)
    return out


def test_a_download_killed_midway_fails_the_read_and_the_next_read_starts_again(
        proxied_store, registry, client, proxy, healthy_again):
    ref, layer, raw = push(registry, client, "killed", host=proxy.host)
    path = blob_path(proxied_store, ref, layer)
    proxy.set(fp.TRICKLE, drop=True)  # the download crawls ...
    before = proxy.stats.bytes_down
    reading = ThreadPoolExecutor(1)
    try:
        pending = reading.submit(read_direct, path, [(0, 4096)])
        wait_until(lambda: proxy.stats.bytes_down > before, "the download started")
        assert not pending.done()
        registry.stop()  # ... and its registry dies under it
        proxy.set(fp.REFUSE, drop=True)
        with pytest.raises(OSError) as e:
            pending.result(LIVENESS)
        assert e.value.errno == errno.EIO
    finally:
        reading.shutdown(wait=False)
    assert f"layer {layer.digest}: blob download failed" in proxied_store.log()
    registry.start()
    proxy.set(fp.PASS)
    assert bounded(read_direct, path, [(256 << 10, 4096), (0, 4096)]) == [raw[256 << 10:(256 << 10) + 4096],
                                                                            raw[:4096]]


# ---- the reader itself, in-process: interruption and dropping --------------------------------
@pytest.fixture
def local_store(tmp_path, proxy):
    config = Config()
    config.registry.registries_conf = str(write_registries_conf(tmp_path / "registries.conf",
                                                                [proxy.host]))
    config.registry.read_timeout = LIVENESS  # a stalled answer waits for the test, not for a timeout
    config.fetch.background = False
    store = build_store(tmp_path / "root", config)
    yield store, tmp_path / "root" / "cache"
    store.close()


def blob_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("als-blob-")]


def test_an_interrupted_read_returns_and_a_dropped_reader_stops_its_download(
        local_store, registry, client, proxy, healthy_again, caplog):
    caplog.set_level(logging.DEBUG, logger="als.blob")
    store, spool_dir = local_store
    ref, layer, raw = push(registry, client, "dropped", host=proxy.host)
    found = store.layer(ref, layer.digest)
    proxy.set(fp.STALL, drop=True)  # the download hangs on the registry's answer
    reader = BlobReader(found, spool_dir)
    cancel = threading.Event()
    reading = ThreadPoolExecutor(1)
    try:
        pending = reading.submit(reader.read, 0, 4096, cancel)
        wait_until(lambda: spool_files(os.getpid(), spool_dir.parent), "the download started")
        cancel.set()
        with pytest.raises(Interrupted):
            pending.result(LIVENESS)
    finally:
        reading.shutdown(wait=False)
    assert not reader.ready() and blob_threads()  # the download goes on for the next read ...
    del reader, pending
    gc.collect()
    proxy.set(fp.PASS)  # the answer comes: the download sees nobody is left to read it, and stops
    wait_until(lambda: not blob_threads(), "the dropped reader's download ended")
    assert "blob download stopped: its reader is gone" in caplog.text
    assert "downloaded and verified" not in caplog.text
    assert spool_files(os.getpid(), spool_dir.parent) == []
    reader = BlobReader(found, spool_dir)
    assert bounded(reader.read, 100, 1000) == raw[100:1100] and reader.ready()
    assert reader.read(layer.size - 10, 100) == raw[-10:] and reader.read(layer.size, 100) == b""
    assert spool_files(os.getpid(), spool_dir.parent)
    del reader
    gc.collect()
    wait_until(lambda: not spool_files(os.getpid(), spool_dir.parent), "the dropped reader's spool was freed")


def test_a_spool_nobody_reads_is_freed_and_a_later_read_downloads_again(local_store, registry, client, proxy,
                                                                        healthy_again):
    store, spool_dir = local_store
    ref, layer, raw = push(registry, client, "idle", host=proxy.host)
    reader = BlobReader(store.layer(ref, layer.digest), spool_dir, idle=0.2)
    mark = registry.mark()
    assert bounded(reader.read, 0, 1000) == raw[:1000] and reader.ready()
    wait_until(lambda: not spool_files(os.getpid(), spool_dir.parent), "the idle spool was freed")
    assert not reader.ready()  # the reader is still there: only the spool went
    assert bounded(reader.read, layer.size - 1000, 1000) == raw[-1000:]
    downloads = [a for a in registry.accesses_since(mark) if a.method == "GET" and a.uri.endswith(layer.digest)]
    assert sum(a.written for a in downloads) == 2 * layer.size
