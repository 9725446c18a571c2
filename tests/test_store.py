"""The store's warming through a real mount: landmark prefetch and background fetch."""

from __future__ import annotations

import os
import time

import pytest

from tests.support import images
from tests.support.store_process import StoreProcess

CHUNK = 128 << 10


@pytest.fixture(scope="module")
def warm_store(registries_conf, tmp_path_factory):
    with StoreProcess(tmp_path_factory.mktemp("warm"), registries_conf=registries_conf,
                      config="[fetch]\nbackground_step = 524288\n") as s:
        yield s


def push_files(registry, client, repo, files, prioritized=None):
    ref = f"{registry.host}/{repo}:esgz"
    return ref, images.push_files(client, ref, files, chunk_size=CHUNK, level=1, prioritized=prioritized)


def wait_for(store, text, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in store.log():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the store log after {timeout}s")


def blob_requests(registry, mark, digest):
    return [a for a in registry.accesses_since(mark) if a.method == "GET" and a.uri.endswith(digest)]


def test_landmark_prefetch_fetches_the_prioritised_files_in_one_request(store, registry, client):
    files = {f"lib/m{i}.py": os.urandom(20_000) for i in range(30)}
    files["big.bin"] = os.urandom(6 * CHUNK)
    wanted = ["lib/m3.py", "lib/m17.py", "lib/m29.py"]
    ref, layer = push_files(registry, client, "prefetch", files, prioritized=wanted)
    mark = registry.mark()
    os.stat(store.layer_dir(ref, layer.digest) / "diff")  # resolve: footer + TOC, then the prefetch
    wait_for(store, f"layer {layer.digest}: prefetched")
    requests = blob_requests(registry, mark, layer.digest)
    assert len(requests) == 2  # the tail (footer and TOC), then the whole prioritised front at once
    mark = registry.mark()
    for name in wanted:
        assert (store.layer_dir(ref, layer.digest) / "diff" / name).read_bytes() == files[name]
    assert blob_requests(registry, mark, layer.digest) == []
    assert sum(a.written for a in requests) < layer.size / 2


def test_background_fetch_completes_a_layer_then_reads_stay_local(warm_store, registry, client):
    files = {f"d/f{i}": os.urandom(3 * CHUNK) for i in range(12)}
    ref, layer = push_files(registry, client, "background", files)
    mark = registry.mark()
    os.stat(warm_store.layer_dir(ref, layer.digest) / "diff")
    wait_for(warm_store, f"layer {layer.digest}: background fetch done")
    requests = blob_requests(registry, mark, layer.digest)
    assert len(requests) > 2  # in steps, yielding to reads in between
    # everything once; only the chunk straddling the start of the tail read is fetched twice, in part
    assert sum(a.written for a in requests) <= layer.size + 2 * CHUNK
    mark = registry.mark()
    for name, data in files.items():
        assert (warm_store.layer_dir(ref, layer.digest) / "diff" / name).read_bytes() == data
    assert blob_requests(registry, mark, layer.digest) == []
