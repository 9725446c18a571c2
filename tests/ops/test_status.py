"""`als status` against a real daemon: images, layers, cache use, declines and registry errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from als.ops import status
from als.tools.image import estargz_layer, gzip_layer, push_image
from als.reference import parse_reference
from tests.support import images
from tests.support.registry import free_port
from tests.support.store_process import REPO, StoreProcess

CHUNK = 256 << 10


def als(*args):
    return subprocess.run([sys.executable, "-m", "als", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


@pytest.fixture(scope="module")
def pushed(registry, client):
    layers = [estargz_layer(io.BytesIO(t), chunk_size=CHUNK) for t in images.tree_layers()]
    ref = f"{registry.host}/status/tree:esgz"
    push_image(client, parse_reference(ref), layers)
    plain = [gzip_layer(images.tree_layers()[2])]
    plain_ref = f"{registry.host}/status/tree:gzip"
    push_image(client, parse_reference(plain_ref), plain)
    return ref, layers, plain_ref, plain


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, registries_conf):
    with StoreProcess(tmp_path_factory.mktemp("status"), registries_conf=registries_conf,
                      config="[fetch]\nbackground = false\n") as s:
        yield s


def status_json(s) -> dict:
    r = als("status", "--root", str(s.root), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def layer_of(st: dict, ref: str, digest: str) -> dict:
    image = next(i for i in st["images"] if i["ref"] == ref)
    return next(l for l in image["layers"] if l["digest"] == digest)


def test_status_shows_layers_and_how_much_of_each_is_cached(daemon, pushed):
    ref, layers, plain_ref, plain = pushed
    st = status_json(daemon)
    assert st["mountpoint"] == str(daemon.mountpoint) and st["root"] == str(daemon.root)
    assert st["pid"] == daemon.proc.pid
    assert all(i["ref"] not in (ref, plain_ref) for i in st["images"])

    top = daemon.layer_dir(ref, layers[2].digest)
    assert (top / "info").exists()
    before = layer_of(status_json(daemon), ref, layers[2].digest)
    assert before["state"] == "ready" and before["compressed_bytes"] == layers[2].size
    assert before["cached_bytes"] < before["file_bytes"]

    data = (top / "diff/tree/new_in_3").read_bytes()  # 1 MiB: nearly all of the layer's file bytes
    after = layer_of(status_json(daemon), ref, layers[2].digest)
    assert after["cached_bytes"] > before["cached_bytes"] and after["cached_bytes"] >= len(data)
    assert after["file_bytes"] == before["file_bytes"]

    assert not os.path.exists(daemon.layer_dir(plain_ref, plain[0].digest) / "diff")
    st = status_json(daemon)
    declined = layer_of(st, plain_ref, plain[0].digest)
    assert declined["state"] == "declined"
    assert declined["reason"].startswith("no containerd.io/snapshot/stargz/toc.digest annotation")

    table = als("status", "--root", str(daemon.root))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("als ") and str(daemon.mountpoint) in lines[0]
    assert any(l.startswith("cache: ") for l in lines)
    assert any(ref in l and layers[0].digest[7:19] in l and "ready" in l for l in lines)
    assert any(layers[2].digest[7:19] in l and " of " in l and "%" in l for l in lines)
    assert any(plain[0].digest[7:19] in l and "declined" in l and "no containerd.io/snapshot" in l for l in lines)
    assert "registry errors in the last 10 minutes: none" in table.stdout


def test_registry_errors_are_listed(daemon):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    ref = f"{dead}/status/nothing:1"
    with pytest.raises(OSError):
        os.stat(daemon.layer_dir(ref, "sha256:" + "a" * 64) / "diff")
    st = status_json(daemon)
    image = next(i for i in st["images"] if i["ref"] == ref)
    assert image["state"] == "failed" and dead in image["error"]
    # The manifest and the layer's tail are asked for at once: either may fail first.
    errors = [e for e in st["registry_errors"] if e["registry"] == dead]
    assert "manifest" in {e["what"] for e in errors}
    table = als("status", "--root", str(daemon.root)).stdout
    assert f"{dead} manifest:" in table and "registry errors in the last 10 minutes: " in table


def test_status_without_a_daemon_says_so(tmp_path):
    r = als("status", "--root", str(tmp_path))
    assert r.returncode == 1
    assert f"cannot reach the store at {tmp_path}/als.sock" in r.stderr


def test_render_handles_an_empty_store():
    st = {"version": "0", "pid": 1, "mountpoint": "/m", "root": "/r", "uptime_seconds": 3725,
          "cache": {"bytes": 0, "entries": 0, "limit_bytes": 0, "hits": 0, "misses": 0},
          "inflight_chunks": 0, "background": [{"layer": "x", "fetched_bytes": 1, "total_bytes": 1025}],
          "images": [], "registry_errors_window_seconds": 600, "registry_errors": []}
    text = status.render(st)
    assert "up 1h02m" in text and "no image looked up yet" in text and "1.0 KiB left" in text


def test_status_names_who_keeps_the_fuse_connections(daemon):
    st = status_json(daemon)
    text = als("status", "--root", str(daemon.root)).stdout
    if "FUSE connections kept by the connection holder" not in daemon.log():
        assert st["connections"] == {"kept_by": None, "holder_pid": None}  # a kernel older than 6.9
        assert "FUSE connections not kept" in text
        return
    pid = st["connections"]["holder_pid"]
    assert st["connections"]["kept_by"] == "holder" and pid != daemon.proc.pid
    assert f"connection holder (pid {pid})" in daemon.log()  # the holder the store started
    assert open(f"/proc/{pid}/cmdline").read().split("\0")[1:3] == ["-m", "als.ops.holder"]
    assert f"FUSE connections kept by the connection holder (pid {pid})" in text
