"""Hundreds of concurrent readers across layers, on the same and different chunks.

Each reader drops the kernel's cached pages of its file before reading
(POSIX_FADV_DONTNEED), so its reads really reach the daemon instead of the
page cache. The bytes must be right, the daemon must not deadlock (the whole
run has a time bound, each thread a join timeout), its threads and memory
must stay bounded (sampled from /proc while it runs), and chunks read by
many at once must be fetched about once.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
import threading
import time
from dataclasses import dataclass

import pytest

from als.tools.image import estargz_layer, push_image
from als.reference import parse_reference
from tests.support import procstat
from tests.support.store_process import StoreProcess

CONFIG = "[fetch]\nbackground = false\n"


@dataclass
class Result:
    reads: int = 0
    bytes_verified: int = 0
    wrong: int = 0
    errors: int = 0
    max_threads: int = 0
    peak_rss_mib: float = 0.0
    base_rss_mib: float = 0.0
    fetched: int = 0
    elapsed: float = 0.0


def build(registry, client, layers: int, size: int, chunk: int, tag: str):
    rng = random.Random(tag)
    out = []
    for i in range(layers):
        data = rng.randbytes(size)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            info = tarfile.TarInfo("data")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        layer = estargz_layer(io.BytesIO(buf.getvalue()), chunk_size=chunk, level=1)
        ref = f"{registry.host}/many/{tag}{i}:v1"
        push_image(client, parse_reference(ref), [layer])
        out.append((ref, layer, data))
    return out


def hammer(store, registry, images, readers: int, reads_each: int, chunk: int, limit: float) -> Result:
    """``readers`` threads, released together, each doing ``reads_each`` random verified reads."""
    paths = []
    for ref, layer, data in images:
        p = store.layer_dir(ref, layer.digest) / "diff" / "data"
        assert p.stat().st_size == len(data)  # resolved before the burst
        paths.append((p, data))
    pid = store.proc.pid
    res = Result(base_rss_mib=procstat.rss_mib(pid))
    procstat.reset_peak(pid)
    mark = registry.mark()
    barrier = threading.Barrier(readers)
    lock = threading.Lock()
    hot = [(i, rng_off) for i in range(len(paths)) for rng_off in (0, chunk * 3)]  # chunks everyone wants

    def run(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait(30)
        for n in range(reads_each):
            if n % 3 == 0:
                i, offset = rng.choice(hot)
            else:
                i = rng.randrange(len(paths))
                offset = rng.randrange(len(paths[i][1]))
            path, data = paths[i]
            size = rng.choice([4096, chunk // 2, chunk, 2 * chunk + 5])
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # make the daemon serve it
                    got = os.pread(fd, size, offset)
                finally:
                    os.close(fd)
            except OSError:
                with lock:
                    res.errors += 1
                continue
            want = data[offset:offset + size]
            with lock:
                res.reads += 1
                res.bytes_verified += len(got)
                if got != want:
                    res.wrong += 1

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in range(readers)]
    t0 = time.monotonic()
    with procstat.Sampler(pid) as sampler:
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(limit - (time.monotonic() - t0), 1))
        res.elapsed = time.monotonic() - t0
    stuck = sum(t.is_alive() for t in threads)
    assert not stuck, f"{stuck} readers still blocked after {limit}s: a deadlock or a hung request"
    res.max_threads = sampler.max_threads
    res.peak_rss_mib = procstat.peak_rss_mib(pid)
    digests = {layer.digest for _, layer, _ in images}
    res.fetched = sum(a.written for a in registry.accesses_since(mark) if any(d in a.uri for d in digests))
    return res


@pytest.fixture(scope="module")
def store(registries_conf, tmp_path_factory):
    with StoreProcess(tmp_path_factory.mktemp("many"), registries_conf=registries_conf, config=CONFIG) as s:
        yield s


def test_hundreds_of_concurrent_readers_get_the_right_bytes_without_deadlock(store, registry, client):
    chunk = 256 << 10
    images = build(registry, client, layers=3, size=24 * chunk, chunk=chunk, tag="ci")
    readers = 240
    res = hammer(store, registry, images, readers=readers, reads_each=12, chunk=chunk, limit=90)
    total = sum(layer.size for _, layer, _ in images)
    print(f"\n{readers} readers: {res.reads} reads, {res.bytes_verified} bytes verified, {res.wrong} wrong, "
          f"{res.errors} errors in {res.elapsed:.1f}s; daemon threads max {res.max_threads}, RSS "
          f"{res.base_rss_mib:.0f} -> peak {res.peak_rss_mib:.0f} MiB; fetched {res.fetched} bytes "
          f"of {total} in the layers")
    assert res.wrong == 0 and res.errors == 0
    assert res.reads == readers * 12
    # fixed pools of FUSE threads per mount ([fuse] threads 16 and waiting_threads 64, two mounts), whatever
    # the number of callers (240 here), plus our own bounded pools (resolve, TOC parse, fetch, cache writer,
    # control)
    assert res.max_threads <= 2 * (16 + 64) + 40, res.max_threads
    assert res.peak_rss_mib - res.base_rss_mib < 400, res.peak_rss_mib
    assert res.fetched <= 2 * total  # shared and cached: each chunk fetched about once
    assert store.proc.poll() is None
