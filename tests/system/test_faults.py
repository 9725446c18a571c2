"""Registry faults injected for real: a TCP proxy of our own between `als serve` and docker-registry.

The store reaches the registry only through tests/support/faultproxy.py, which
answers 500s, resets connections, cuts answers short, stalls or trickles them
on command; the registry process itself is also stopped, restarted, and
frozen with SIGSTOP. Every read must either return the right bytes or fail
with EIO within the configured bound (no FUSE request waits longer), and
once the registry behaves again the same reads must work without restarting
the store: failed fetches and failed resolutions are not remembered for long.
Totals (faults injected, reads, bytes verified, slowest read) are figures for
the soak run, `test_soak.py::test_soak_faults_under_load`, not checks here.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import tarfile
import threading
import time
from pathlib import Path

import pytest

from als.tools.image import estargz_layer, push_image
from als.reference import parse_reference
from tests.support import faultproxy as fp
from tests.support.store_process import StoreProcess, write_registries_conf

CHUNK = 64 << 10
READ_TIMEOUT = 0.5
DEADLINE = 2.5
FAILURE_TTL = 0.5
RESOLVE_TIMEOUT = 5.0
CONFIG = f"""
[resolve]
timeout = {RESOLVE_TIMEOUT}
failure_ttl = {FAILURE_TTL}
tail_size = 4096
[registry]
connect_timeout = 1.0
read_timeout = {READ_TIMEOUT}
retries = 2
request_deadline = {DEADLINE}
[fetch]
background = false
read_timeout = 10.0
"""  # a small tail: the resolve-time tail read would otherwise cache the chunks the faults are aimed at
# The longest one FUSE read request may take: the whole-request deadline plus
# one socket read timeout that may straddle it. The kernel retries a page
# read that failed once, synchronously, so a read() syscall that fails has
# waited for two such requests; slack for a loaded 2-core machine on top.
REQUEST_BOUND = DEADLINE + READ_TIMEOUT
READ_BOUND = 2 * REQUEST_BOUND + 3.0


@pytest.fixture(scope="module")
def proxy(registry):
    with fp.FaultProxy(registry.host, cut_after=1000, trickle_interval=0.2) as p:
        yield p


@pytest.fixture(autouse=True)
def healthy_again(proxy, registry):
    """Every test starts and ends with a working registry behind a passing proxy."""
    proxy.set(fp.PASS)
    yield
    proxy.set(fp.PASS, drop=True)
    if registry.proc is None:
        registry.start()


@pytest.fixture(scope="module")
def store(registry, proxy, tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    conf = write_registries_conf(work / "registries.conf", [registry.host, proxy.host])
    with StoreProcess(work, registries_conf=conf, config=CONFIG) as s:
        yield s


_n = iter(range(1_000_000))


def fresh(registry, client, proxy, chunks: int = 16) -> tuple[str, object, bytes]:
    """A new one-file image (nothing of it cached anywhere), pushed directly, read through the proxy."""
    name = f"f{next(_n)}"
    data = os.urandom(chunks * CHUNK)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("file")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    layer = estargz_layer(io.BytesIO(buf.getvalue()), chunk_size=CHUNK)
    push_image(client, parse_reference(f"{registry.host}/faults/{name}:v1"), [layer])
    return f"{proxy.host}/faults/{name}:v1", layer, data


def resolved(store, ref, layer) -> Path:
    path = store.layer_dir(ref, layer.digest) / "diff" / "file"
    path.stat()
    return path


def timed_read(path: Path, offset: int, size: int) -> tuple[bytes | None, int, float]:
    """Read in a thread with a hard limit, so a hung FUSE request fails the test instead of hanging it."""
    result: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                result["data"] = f.read(size)
        except OSError as e:
            result["errno"] = e.errno
        result["took"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(READ_BOUND + 20)
    assert not t.is_alive(), f"a read of {path} hung for over {READ_BOUND + 20:.0f}s"
    return result.get("data"), result.get("errno", 0), result["took"]


def fails_in_bound(path: Path, offset: int) -> float:
    data, err, took = timed_read(path, offset, 1000)
    assert err == errno.EIO, f"expected EIO, got {err or 'data'}"
    assert took <= READ_BOUND, f"a failing read took {took:.1f}s, over {READ_BOUND:.1f}s"
    return took


def reads_right(path: Path, offset: int, data: bytes, size: int = 1000) -> None:
    got, err, took = timed_read(path, offset, size)
    assert err == 0, f"read failed with errno {err}"
    assert got == data[offset:offset + size]


# ---- reads: fail within the bound, work again once the registry does ------------------------
@pytest.mark.parametrize("mode", [fp.ERROR, fp.RESET, fp.REFUSE, fp.CUT, fp.STALL, fp.TRICKLE])
def test_a_misbehaving_registry_fails_reads_in_bound_and_they_recover(mode, store, registry, client, proxy):
    ref, layer, data = fresh(registry, client, proxy)
    path = resolved(store, ref, layer)
    before = proxy.stats.faults
    proxy.set(mode, drop=True)
    offset = 5 * CHUNK + 10
    took = fails_in_bound(path, offset)
    assert proxy.stats.faults > before  # the fault really was injected
    log = store.log()
    assert f"layer {layer.digest} file /file: read failed" in log
    proxy.set(fp.PASS)
    reads_right(path, offset, data)  # same chunk, same store: the failure was not remembered
    print(f"\n{mode}: failed in {took:.1f}s, then read again")


def test_a_few_500s_are_retried_and_the_read_succeeds(store, registry, client, proxy):
    ref, layer, data = fresh(registry, client, proxy)
    path = resolved(store, ref, layer)
    before = proxy.stats.faults
    proxy.set(fp.ERROR, count=2, drop=True)  # retries = 2: the third attempt gets through
    reads_right(path, 7 * CHUNK, data)
    assert proxy.stats.faults - before == 2
    assert "answered 500" in store.log() and "retry 2/2" in store.log()


def test_the_registry_process_stops_and_comes_back(store, registry, client, proxy):
    ref, layer, data = fresh(registry, client, proxy)
    path = resolved(store, ref, layer)
    registry.stop()
    fails_in_bound(path, 3 * CHUNK)
    registry.start()
    reads_right(path, 3 * CHUNK, data)


def test_a_frozen_registry_process_fails_reads_in_bound(store, registry, client, proxy):
    ref, layer, data = fresh(registry, client, proxy)
    path = resolved(store, ref, layer)
    os.kill(registry.proc.pid, signal.SIGSTOP)
    try:
        fails_in_bound(path, 9 * CHUNK)
    finally:
        os.kill(registry.proc.pid, signal.SIGCONT)
    reads_right(path, 9 * CHUNK, data)


def test_a_chunk_tampered_in_storage_fails_until_it_is_repaired(store, registry, client, proxy):
    """Extends test_fusefs's tampered-chunk test: once the storage is repaired, the same read works."""
    ref, layer, data = fresh(registry, client, proxy)
    path = resolved(store, ref, layer)
    h = layer.digest.split(":")[1]
    blob = registry.root / "data" / "docker/registry/v2/blobs/sha256" / h[:2] / h / "data"
    good = blob.read_bytes()
    bad = bytearray(good)
    bad[4 * CHUNK + CHUNK // 2] ^= 0xFF
    blob.write_bytes(bytes(bad))
    try:
        fails_in_bound(path, 4 * CHUNK)
        fails_in_bound(path, 4 * CHUNK)  # still bad bytes in the registry: still EIO, still not cached
    finally:
        blob.write_bytes(good)
    reads_right(path, 4 * CHUNK, data, CHUNK)


# ---- lookups: bounded too, and a transient failure is not pinned for the TTL -----------------
def test_a_stalled_registry_declines_a_lookup_within_the_resolve_timeout(store, registry, client, proxy):
    ref, layer, _ = fresh(registry, client, proxy)
    proxy.set(fp.STALL, drop=True)
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        os.stat(store.layer_dir(ref, layer.digest) / "diff")
    took = time.monotonic() - t0
    assert e.value.errno == errno.EIO
    assert took <= RESOLVE_TIMEOUT + 2, took


def test_a_failed_image_resolution_is_retried_after_the_failure_ttl(store, registry, client, proxy):
    ref, layer, data = fresh(registry, client, proxy)
    diff = store.layer_dir(ref, layer.digest) / "diff"
    proxy.set(fp.ERROR, drop=True)
    with pytest.raises(OSError) as e:
        os.stat(diff)
    assert e.value.errno == errno.EIO
    assert f"image {ref}: cannot resolve" in store.log()
    proxy.set(fp.PASS)
    time.sleep(FAILURE_TTL + 0.2)
    reads_right(diff / "file", 2 * CHUNK, data)  # well before the 120 s TTL


def test_a_layer_whose_toc_could_not_be_read_is_retried_after_the_failure_ttl(store, registry, client, proxy):
    ref, layer, data = fresh(registry, client, proxy)
    diff = store.layer_dir(ref, layer.digest) / "diff"
    proxy.set(fp.ERROR, match="Range: bytes", drop=True)  # manifest and config pass, blob reads fail
    with pytest.raises(OSError) as e:
        os.stat(diff)
    assert e.value.errno == errno.EIO
    assert f"image {ref} layer {layer.digest}: declined:" in store.log()
    proxy.set(fp.PASS)
    time.sleep(FAILURE_TTL + 0.2)
    reads_right(diff / "file", 11 * CHUNK, data)


def test_a_bad_layer_stays_declined(store, registry, client, proxy):
    """Only transient failures are retried early: a layer that is wrong stays declined for the TTL."""
    from tests.support.rawblob import RawBlob, sha, toc
    b = RawBlob()
    built = b.finish(toc([b.file("f", b"x")]), toc_digest=sha(b"another TOC"))
    push_image(client, parse_reference(f"{registry.host}/faults/bad:v1"), [built.layer])
    ref = f"{proxy.host}/faults/bad:v1"
    diff = store.layer_dir(ref, built.digest) / "diff"
    for _ in range(2):
        with pytest.raises(OSError):
            os.stat(diff)
        time.sleep(FAILURE_TTL + 0.2)
    assert store.log().count(f"image {ref}: resolved manifest") == 1
