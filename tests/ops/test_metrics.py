"""Prometheus metrics from a real `als serve`, scraped over TCP and a unix socket.

The byte counter is checked against the registry's own access log, and every
other number against something the test did through the FUSE mount.
"""

from __future__ import annotations

import io
import os
import stat
import time

import pytest

from als import metrics
from als.ops import exporter
from als.errors import ConfigError
from als.tools.image import estargz_layer, gzip_layer, push_image
from als.reference import parse_reference
from tests.support import images
from tests.support.registry import free_port
from tests.support.scrape import scrape_tcp, scrape_unix, value
from tests.support.store_process import StoreProcess, is_mounted

CHUNK = 256 << 10


@pytest.fixture(scope="module")
def tree(registry, client):
    layers = [estargz_layer(io.BytesIO(t), chunk_size=CHUNK) for t in images.tree_layers()]
    ref = f"{registry.host}/metrics/tree:esgz"
    push_image(client, parse_reference(ref), layers)
    plain = [gzip_layer(images.tree_layers()[1])]
    plain_ref = f"{registry.host}/metrics/tree:gzip"
    push_image(client, parse_reference(plain_ref), plain)
    return ref, layers, plain_ref, plain


def test_parse_address_accepts_loopback_and_unix_only():
    assert exporter.parse_address("") is None
    assert exporter.parse_address("127.0.0.1:9808") == exporter.Address(host="127.0.0.1", port=9808)
    assert exporter.parse_address("127.1.2.3:1") == exporter.Address(host="127.1.2.3", port=1)
    assert exporter.parse_address("localhost:9808") == exporter.Address(host="127.0.0.1", port=9808)
    assert exporter.parse_address("[::1]:9808") == exporter.Address(host="::1", port=9808)
    assert exporter.parse_address("unix:/run/als/m.sock") == exporter.Address(path="/run/als/m.sock")
    assert exporter.parse_address("/run/als/m.sock") == exporter.Address(path="/run/als/m.sock")
    for bad in ("0.0.0.0:9808", "10.0.0.1:9808", "example.com:9808", "127.0.0.1", "127.0.0.1:0",
                "127.0.0.1:70000", "unix:relative.sock", ":9808"):
        with pytest.raises(ConfigError, match="metrics.address"):
            exporter.parse_address(bad)


def test_background_progress_feeds_the_gauges():
    before_total = metrics.BACKGROUND_FETCHED._value.get()
    with metrics.background_fetch("layer x", 1000) as p:
        assert metrics.BACKGROUND_ACTIVE._value.get() >= 1
        remaining = metrics.BACKGROUND_REMAINING._value.get()
        p.advance(300)
        assert metrics.BACKGROUND_REMAINING._value.get() == remaining - 300
        assert {"layer": "layer x", "fetched_bytes": 300, "total_bytes": 1000} in metrics.background_fetches()
        p.advance(5000)  # more than announced: the gauge never goes below what others still need
        assert metrics.BACKGROUND_REMAINING._value.get() == remaining - 1000
    assert metrics.BACKGROUND_FETCHED._value.get() == before_total + 5300
    assert not any(b["layer"] == "layer x" for b in metrics.background_fetches())


def test_a_non_loopback_address_is_refused_before_mounting(tmp_path):
    s = StoreProcess(tmp_path, config='[metrics]\naddress = "0.0.0.0:9808"\n')
    with pytest.raises(RuntimeError, match="only a loopback address"):
        s.start()
    assert not is_mounted(s.mountpoint)


def test_metrics_count_what_the_store_did(tmp_path, registry, registries_conf, tree):
    ref, layers, plain_ref, plain = tree
    port = free_port()
    mark = registry.mark()
    with StoreProcess(tmp_path, registries_conf=registries_conf,
                      config=f'[fetch]\nbackground = false\n[metrics]\naddress = "127.0.0.1:{port}"\n') as s:
        first = scrape_tcp(port)
        assert value(first, "als_layers_resolved_total") == 0
        top = s.layer_dir(ref, layers[0].digest)
        data = (top / "diff/tree/big.bin").read_bytes()
        assert len(data) == 3 * (1 << 20) + 17
        assert not (top / "diff/tree/absent").exists()  # an ENOENT lookup
        assert not os.path.exists(s.layer_dir(plain_ref, plain[0].digest) / "diff")  # declined

        # A read is answered once its own chunks are in; the request that brought them (and what it
        # read ahead) may still be ending: wait, bounded, for the store's count and the registry's log.
        for _ in range(20):  # at most about 8 s
            text = scrape_tcp(port)
            served = sum(a.written for a in registry.accesses_since(mark) if a.status in (200, 206))
            if value(text, "als_registry_fetched_bytes_total", registry=registry.host) == served:
                break
            time.sleep(0.1)
        assert value(text, "als_layers_resolved_total") == len(layers)
        assert value(text, "als_layers_declined_total") == 1
        assert value(text, "als_registry_fetched_bytes_total", registry=registry.host) == served
        assert value(text, "als_registry_fetch_seconds_count", registry=registry.host) >= 2
        assert value(text, "als_cache_misses_total") >= 1
        assert value(text, "als_cache_bytes") >= len(data)
        assert value(text, "als_fuse_operations_total", op="read") >= 1
        assert value(text, "als_fuse_operations_total", op="lookup") >= 3
        assert value(text, "als_fuse_errors_total", op="lookup", errno="EIO") >= 1  # the declined layer
        assert value(text, "als_images") == 2
        assert value(text, "als_inflight_chunks") == 0

        # Drop the kernel's pages of the file: the next read reaches the store, which has it cached.
        hits = value(text, "als_cache_hits_total")
        fd = os.open(top / "diff/tree/big.bin", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, 4096, 0) == data[:4096]
        finally:
            os.close(fd)
        again = scrape_tcp(port)
        assert value(again, "als_cache_hits_total") > hits
        assert value(again, "als_registry_fetched_bytes_total", registry=registry.host) == served


def test_metrics_on_a_unix_socket_and_background_progress(tmp_path, registries_conf, tree):
    ref, layers, _, _ = tree
    sock = tmp_path / "run" / "metrics.sock"
    with StoreProcess(tmp_path, registries_conf=registries_conf,
                      config=f'[fetch]\nbackground = true\n[metrics]\naddress = "unix:{sock}"\n') as s:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        (s.layer_dir(ref, layers[0].digest) / "diff/tree/small.txt").read_bytes()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and s.log().count("background fetch done") < len(layers):
            time.sleep(0.1)
        assert s.log().count("background fetch done") == len(layers), s.log()[-2000:]
        text = scrape_unix(sock)
        assert value(text, "als_background_fetched_bytes_total") > 0
        assert value(text, "als_background_fetch_layers") == 0
        assert value(text, "als_background_fetch_remaining_bytes") == 0
    assert not sock.exists()
