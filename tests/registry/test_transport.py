"""Redirects, retries, timeouts, keep-alive and Range, against a real docker-registry.

Odd behaviour comes from real servers of the test's own on 127.0.0.1: an
"object storage" that docker-registry's redirect middleware sends blob GETs
to (tests/support/objectstore.py), and a reverse proxy in front of the
registry (tests/support/httpfront.py) that counts connections and bytes,
drops Range, or answers 503 or slowly. Every number asserted is counted by
those servers, not inferred from timing.
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from als.errors import RegistryError
from als.reference import parse_reference
from als.registry.client import RegistryClient
from tests.support.httpfront import Front
from tests.support.objectstore import ObjectStore
from tests.support.registry import RegistryProcess
from tests.support.regtest import (fast_client, hermetic_env, insecure, push_image, sha,  # noqa: F401
                                   wait_accesses, write_conf)


def is_blob(digest: str):
    return lambda a: a.method == "GET" and a.uri.endswith(f"/blobs/{digest}")


# ---------------------------------------------------------------------------
# blob redirects
# ---------------------------------------------------------------------------

def redirecting_registry(store: ObjectStore, reg: RegistryProcess) -> RegistryProcess:
    reg.extra = {"middleware": {"storage": [{"name": "redirect",
                                             "options": {"baseurl": store.baseurl()}}]}}
    return reg.start()


@pytest.mark.parametrize("refusal", [403, 401, 410])
def test_blob_redirect_is_remembered_and_renewed_when_it_expires(tmp_path, refusal, caplog):
    reg = RegistryProcess()
    with ObjectStore(reg.root / "data", refusal=refusal) as store:
        try:
            redirecting_registry(store, reg)
            conf = write_conf(tmp_path, insecure(reg.host))
            ref = parse_reference(f"{reg.host}/app:v1")
            caplog.set_level(logging.INFO, logger="als.registry")
            with fast_client(conf) as c:
                image = push_image(c, ref)
                d = sha(image.layer)
                assert c.get_manifest(ref).digest == image.digest
                mark = reg.mark()
                for i in range(10):
                    assert c.read_range(ref, d, 1000 * i, 1000 * i + 500) == \
                        image.layer[1000 * i:1000 * i + 500]
                # one trip through the registry (a 307), then straight to storage
                assert [a.status for a in wait_accesses(reg, mark, is_blob(d))] == [307]
                assert [(r.generation, r.status) for r in store.seen()] == [(1, 206)] * 10
                assert all(r.range.startswith("bytes=") for r in store.seen())

                # The signed URLs expire: the old ones get `refusal`, the registry hands out new ones.
                store.rotate()
                reg.stop()
                redirecting_registry(store, reg)
                mark = reg.mark()
                for i in range(5):
                    assert c.read_range(ref, d, 7 * i, 7 * i + 7) == image.layer[7 * i:7 * i + 7]
                seen = [(r.generation, r.status) for r in store.seen()[10:]]
                assert seen == [(1, refusal), (2, 206), (2, 206), (2, 206), (2, 206), (2, 206)]
                accesses = wait_accesses(reg, mark, lambda a: a.method == "GET")
                assert [(a.uri, a.status) for a in accesses] == [(f"/v2/app/blobs/{d}", 307)]
                # no manifest was read again
                assert not [a for a in reg.accesses_since(mark) if "/manifests/" in a.uri]
        finally:
            reg.cleanup()
    assert f"no longer works (HTTP {refusal}); asking the registry again" in caplog.text


def test_stream_through_a_redirect(tmp_path):
    reg = RegistryProcess()
    with ObjectStore(reg.root / "data") as store:
        try:
            redirecting_registry(store, reg)
            with fast_client(write_conf(tmp_path, insecure(reg.host))) as c:
                ref = parse_reference(f"{reg.host}/app:v1")
                image = push_image(c, ref)
                with c.open_stream(ref, sha(image.layer)) as s:
                    assert b"".join(s) == image.layer  # verified against the digest as it streams
                with c.open_stream(ref, sha(image.layer), 12345) as s:
                    assert s.read() == image.layer[12345:]
            assert [r.status for r in store.seen()] == [200, 206]
        finally:
            reg.cleanup()


# ---------------------------------------------------------------------------
# connections, Range, retries, timeouts
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_image(tmp_path_factory):
    """A registry with an image whose layer is 32 MiB of random bytes."""
    reg = RegistryProcess().start()
    try:
        d = tmp_path_factory.mktemp("conf")
        (d / "registries.conf").write_text(insecure(reg.host))
        from als.registry.sysregistries import RegistriesConf
        with fast_client(RegistriesConf.load(str(d / "registries.conf"))) as c:
            ref = parse_reference(f"{reg.host}/big:v1")
            layer = random.Random(7).randbytes(32 << 20)
            c.push_blob(ref, layer, sha(layer), len(layer))
        yield reg, ref, layer
    finally:
        reg.cleanup()


def front_client(front: Front, tmp_path, **kw) -> RegistryClient:
    return fast_client(write_conf(tmp_path, insecure(front.host)), **kw)


def test_connections_are_pooled_and_kept_alive(big_image, tmp_path):
    reg, ref, layer = big_image
    d = sha(layer)
    with Front(reg.host) as front:
        r = parse_reference(f"{front.host}/big:v1")
        with front_client(front, tmp_path) as c:
            for i in range(40):
                assert c.read_range(r, d, i * 4096, i * 4096 + 100) == layer[i * 4096:i * 4096 + 100]
            # one connection for the failed HTTPS probe (the registry is plain HTTP), one reused
            assert front.connections <= 2
            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda i: c.read_range(r, d, i * 999, i * 999 + 10), range(200)))
            assert got == [layer[i * 999:i * 999 + 10] for i in range(200)]
            assert front.connections <= 2 + 8  # at most one per thread, kept in the pool
    assert len(front.seen(lambda s: s.method == "GET")) == 240


def test_registry_that_ignores_range(big_image, tmp_path):
    reg, ref, layer = big_image
    d, n = sha(layer), len(layer)
    with Front(reg.host, strip_range=True) as front:
        r = parse_reference(f"{front.host}/big:v1")
        with front_client(front, tmp_path) as c:
            assert c.read_range(r, d, 1000, 3000) == layer[1000:3000]
            got = front.seen(lambda s: "/blobs/" in s.path)
            assert got[0].status == 200 and got[0].headers.get("Range") == "bytes=1000-2999"
            # the client stopped reading at byte 3000 and dropped the connection: the
            # proxy managed to write at most what the socket buffers held, not 32 MiB
            deadline = time.monotonic() + 5
            while got[0].written == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert got[0].written < n // 2, got[0].written
            # and when the bytes are at the end, the whole body is read, correctly
            assert c.read_range(r, d, n - 100, n) == layer[n - 100:]
            with c.open_stream(r, d, n - 5000) as s:
                assert s.read() == layer[n - 5000:]


def test_retries_with_backoff_then_success(big_image, tmp_path, caplog):
    reg, ref, layer = big_image
    d = sha(layer)
    failures = {"left": 3}

    def flaky(seen):
        if "/blobs/" in seen.path and failures["left"] > 0:
            failures["left"] -= 1
            return 503, {}, b"busy"
        return None

    caplog.set_level(logging.INFO, logger="als.registry")
    with Front(reg.host, hook=flaky) as front:
        r = parse_reference(f"{front.host}/big:v1")
        with front_client(front, tmp_path, retries=3, backoff=0.2, max_backoff=5.0) as c:
            assert c.read_range(r, d, 0, 10) == layer[:10]
        tries = front.seen(lambda s: "/blobs/" in s.path)
    assert [s.status for s in tries] == [503, 503, 503, 206]
    gaps = [b.at - a.at for a, b in zip(tries, tries[1:])]
    # exponential: at least half of 0.2, 0.4, 0.8 s (the delay is jittered in [50 %, 100 %])
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4, gaps
    assert "retry 3/3" in caplog.text


def test_retries_are_bounded_in_count_and_honour_retry_after(big_image, tmp_path):
    reg, ref, layer = big_image
    with Front(reg.host, hook=lambda s: (503, {"Retry-After": "1"}, b"") if "/blobs/" in s.path
               else None) as front:
        r = parse_reference(f"{front.host}/big:v1")
        with front_client(front, tmp_path, retries=2, backoff=0.01) as c:
            t0 = time.monotonic()
            with pytest.raises(RegistryError, match="answered 503.*gave up after 3 attempts"):
                c.read_range(r, sha(layer), 0, 10)
            elapsed = time.monotonic() - t0
        assert len(front.seen(lambda s: "/blobs/" in s.path)) == 3
    assert 2.0 <= elapsed < 10  # two waits of Retry-After: 1 s, not of the 10 ms backoff


def test_retry_deadline_bounds_the_total_time(big_image, tmp_path):
    reg, ref, layer = big_image
    with Front(reg.host, hook=lambda s: (503, {"Retry-After": "3"}, b"") if "/blobs/" in s.path
               else None) as front:
        r = parse_reference(f"{front.host}/big:v1")
        with front_client(front, tmp_path, retries=50, retry_deadline=2.0) as c:
            t0 = time.monotonic()
            with pytest.raises(RegistryError, match="gave up"):
                c.read_range(r, sha(layer), 0, 10)
            assert time.monotonic() - t0 < 2.5
        assert len(front.seen(lambda s: "/blobs/" in s.path)) < 5


def test_a_slow_answer_times_out_and_is_retried(big_image, tmp_path):
    reg, ref, layer = big_image
    stalls = {"left": 1}

    def slow(seen):
        if "/blobs/" in seen.path and stalls["left"] > 0:
            stalls["left"] -= 1
            time.sleep(2.0)  # past the client's read timeout
        return None

    with Front(reg.host, hook=slow) as front:
        r = parse_reference(f"{front.host}/big:v1")
        with front_client(front, tmp_path, read_timeout=0.5, retries=2) as c:
            t0 = time.monotonic()
            assert c.read_range(r, sha(layer), 10, 20) == layer[10:20]
            assert time.monotonic() - t0 < 2.0  # did not wait for the stalled answer
        assert len(front.seen(lambda s: "/blobs/" in s.path)) == 2
