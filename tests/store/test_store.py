"""The store: warming through a real mount (landmark prefetch, background fetch), and the bound on
the layers it keeps in memory (eviction, and rebuilding from the state directory), in-process."""

from __future__ import annotations

import io
import logging
import os
import threading
import time

import pytest

from als.ops import status
from als.registry.client import RegistryClient
from als.store import build
from als.formats import estargz
from als.tools.image import estargz_layer, push_image
from als.reference import parse_reference
from tests.support import images, inprocess
from tests.support.store_process import StoreProcess, wait_log

CHUNK = 128 << 10


@pytest.fixture(scope="module")
def warm_store(registries_conf, tmp_path_factory):
    with StoreProcess(tmp_path_factory.mktemp("warm"), registries_conf=registries_conf,
                      config="[fetch]\nbackground_step = 524288\n") as s:
        yield s


def push_files(registry, client, repo, files, prioritized=None):
    ref = f"{registry.host}/{repo}:esgz"
    return ref, images.push_files(client, ref, files, chunk_size=CHUNK, level=1, prioritized=prioritized)


def blob_requests(registry, mark, digest):
    return [a for a in registry.accesses_since(mark) if a.method == "GET" and a.uri.endswith(digest)]


def test_landmark_prefetch_fetches_the_prioritised_files_in_one_request(store, registry, client):
    files = {f"lib/m{i}.py": os.urandom(20_000) for i in range(30)}
    files["big.bin"] = os.urandom(6 * CHUNK)
    wanted = ["lib/m3.py", "lib/m17.py", "lib/m29.py"]
    ref, layer = push_files(registry, client, "prefetch", files, prioritized=wanted)
    mark = registry.mark()
    os.stat(store.layer_dir(ref, layer.digest) / "diff")  # resolve: footer + TOC, then the prefetch
    wait_log(store, f"layer {layer.digest}: prefetched", 30.0)
    requests = blob_requests(registry, mark, layer.digest)
    assert len(requests) == 2  # the tail (footer and TOC), then the whole prioritised front at once
    mark = registry.mark()
    for name in wanted:
        assert (store.layer_dir(ref, layer.digest) / "diff" / name).read_bytes() == files[name]
    assert blob_requests(registry, mark, layer.digest) == []
    assert sum(a.written for a in requests) < layer.size / 2


def test_an_optimized_layers_front_is_read_while_its_tree_is_still_being_built(registry, client, registries_conf,
                                                                               tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="als.store")
    files = {f"lib/m{i}.py": os.urandom(20_000) for i in range(30)}
    wanted = ["lib/m3.py", "lib/m17.py", "lib/m29.py"]
    ref, layer = push_files(registry, client, "front", files, prioritized=wanted)
    building, release = threading.Event(), threading.Event()
    tree = build.LayerView

    def held(*args, **kwargs):  # the tree (most of a build's time) waits until the test has looked
        building.set()
        release.wait(30)  # longer than the test looks for the front's request
        return tree(*args, **kwargs)

    monkeypatch.setattr(build, "LayerView", held)
    with inprocess.store(tmp_path, registries_conf, "[fetch]\nbackground = false\npredict = false\n") as s:
        mark = registry.mark()
        resolved = []
        t = threading.Thread(target=lambda: resolved.append(s.layer(ref, layer.digest)), daemon=True)
        t.start()
        assert building.wait(10)
        deadline = time.monotonic() + 5
        while len(blob_requests(registry, mark, layer.digest)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        while_building = len(blob_requests(registry, mark, layer.digest))
        release.set()
        t.join(10)
        deadline = time.monotonic() + 10
        while "prefetched" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert while_building == 2  # the tail (footer and TOC), then the prioritised front
        for name in wanted:
            assert inprocess.read_file(s, resolved[0], name) == files[name]
        assert len(blob_requests(registry, mark, layer.digest)) == 2


def test_fronts_held_up_by_the_registry_never_hold_up_another_images_resolution(registry, client, registries_conf,
                                                                                tmp_path, monkeypatch):
    def optimized(repo):
        files = {f"m{j}": os.urandom(300_000) for j in range(4)}  # past the tail read: the front starts at 0
        return push_files(registry, client, repo, files, prioritized=["m0", "m1"])

    held = [optimized(f"held{i}") for i in range(4)]
    other = push_files(registry, client, "other", {"f": os.urandom(5000)})
    release = threading.Event()
    stream = RegistryClient.stream_range

    def slow_fronts(self, ref, digest, start, end, sink):  # every front read waits on the test
        if start == 0 and digest in {layer.digest for _, layer in held}:
            release.wait(30)
        return stream(self, ref, digest, start, end, sink)

    monkeypatch.setattr(RegistryClient, "stream_range", slow_fronts)
    with inprocess.store(tmp_path, registries_conf, "[fetch]\nbackground = false\npredict = false\n") as s:
        try:
            for ref, layer in held:
                s.layer(ref, layer.digest)
            resolved = []
            t = threading.Thread(target=lambda: resolved.append(s.layer(other[0], other[1].digest)), daemon=True)
            t.start()
            t.join(10)
            assert resolved, "another image's layer waited for the fronts"
        finally:
            release.set()


def test_a_layers_prefetch_never_queues_behind_another_layers_background_fetch(registry, client, registries_conf,
                                                                                tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="als.store")
    pushed = [push_files(registry, client, f"queue{i}", {f"m{j}": os.urandom(200_000) for j in range(8)},
                         prioritized=["m1"]) for i in range(2)]
    # One background fetch at a time, which waits a minute for a container that never comes.
    config = "[fetch]\npredict = false\nbackground_layers = 1\nbackground_delay = 60\n"
    with inprocess.store(tmp_path, registries_conf, config) as s:
        for ref, layer in pushed:
            s.layer(ref, layer.digest)
        def prefetched():  # another test's store may still log prefetches of its own
            return [f"layer {layer.digest}: prefetched" in caplog.text for _, layer in pushed]

        deadline = time.monotonic() + 10
        while not all(prefetched()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert prefetched() == [True, True]


def test_background_fetch_completes_a_layer_then_reads_stay_local(warm_store, registry, client):
    files = {f"d/f{i}": os.urandom(3 * CHUNK) for i in range(12)}
    ref, layer = push_files(registry, client, "background", files)
    mark = registry.mark()
    os.stat(warm_store.layer_dir(ref, layer.digest) / "diff")
    wait_log(warm_store, f"layer {layer.digest}: background fetch done", 30.0)
    requests = blob_requests(registry, mark, layer.digest)
    assert len(requests) > 2  # in steps, yielding to reads in between
    # everything once; only the chunk straddling the start of the tail read is fetched twice, in part
    assert sum(a.written for a in requests) <= layer.size + 2 * CHUNK
    mark = registry.mark()
    for name, data in files.items():
        assert (warm_store.layer_dir(ref, layer.digest) / "diff" / name).read_bytes() == data
    assert blob_requests(registry, mark, layer.digest) == []


# ---- the bound on layers kept in memory -----------------------------------------------------
def evicting(bound: int, extra: str = "") -> str:
    """A config bounding idle layers, with nothing fetched behind the test's back."""
    return f"[resolve]\nmax_idle_layers = {bound}\n{extra}[fetch]\nbackground = false\npredict = false\n"


def one_layer_images(registry, client, tag: str, count: int) -> list[tuple[str, object, dict]]:
    out = []
    for i in range(count):
        files = {"f": os.urandom(3000 + i), "g": os.urandom(500)}
        ref = f"{registry.host}/evict/{tag}{i}:esgz"
        out.append((ref, images.push_files(client, ref, files, chunk_size=CHUNK), files))
    return out


def names(ref: str, layer) -> list[tuple[str, str]]:
    """What the eviction hook hears for one layer: each name containers/storage may look it up by."""
    return [(ref, layer.digest), (ref, layer.annotations[estargz.TOC_DIGEST_ANNOTATION])]


def recorded(store) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    store.on_evict.append(lambda ref, digest: seen.append((ref, digest)))
    return seen


def held(store) -> set[tuple[str, str]]:
    return {(l.ref, l.desc.digest) for l in store.layers()}


def test_unused_layers_past_the_bound_go_least_recently_looked_up_first_and_come_back_from_state(
        registry, client, registries_conf, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="als.store")
    (r0, l0, f0), (r1, l1, _), (r2, l2, _), (r3, l3, _) = one_layer_images(registry, client, "lru", 4)
    with inprocess.store(tmp_path, registries_conf, evicting(2)) as s:
        seen = recorded(s)
        first = s.layer(r0, l0.digest)
        ino = first.view.lookup(["f"]).ino
        s.layer(r1, l1.digest)
        assert seen == []
        s.layer(r2, l2.digest)
        assert seen == names(r0, l0)  # three unused layers, two kept: the least recently looked up goes
        assert f"image {r0} layer {l0.digest}: dropped from memory" in caplog.text
        s.layer(r1, l1.digest)  # looked up again: now r2's layer is the oldest
        s.layer(r3, l3.digest)
        assert seen == names(r0, l0) + names(r2, l2)
        assert held(s) == {(r1, l1.digest), (r3, l3.digest)}

        mark = registry.mark()
        again = s.layer(r0, l0.digest)
        assert registry.accesses_since(mark) == []  # no TOC (and no manifest) read: rebuilt from the state dir
        assert f"image {r0} layer {l0.digest}: rebuilt from saved metadata" in caplog.text
        assert again is not first and again.view.lookup(["f"]).ino == ino  # same inode numbers
        assert inprocess.read_file(s, again, "f") == f0["f"]
        assert seen[4:] == names(r1, l1)  # r0's layer is back: r1's is now the least recently looked up
        assert held(s) == {(r3, l3.digest), (r0, l0.digest)}


def test_layers_in_use_are_neither_evicted_nor_counted(registry, client, registries_conf, tmp_path):
    (r0, l0, _), (r1, l1, _), (r2, l2, _), (r3, l3, _) = one_layer_images(registry, client, "use", 4)
    with inprocess.store(tmp_path, registries_conf, evicting(1)) as s:
        seen = recorded(s)
        s.layer(r0, l0.digest)
        s.use(r0, l0.digest)
        toc1 = l1.annotations[estargz.TOC_DIGEST_ANNOTATION]
        s.layer(r1, toc1)  # Podman >= 5.1 names a layer by its TOC digest, and counts uses under that name
        s.use(r1, toc1)
        s.layer(r2, l2.digest)
        assert seen == []
        s.layer(r3, l3.digest)
        assert seen == names(r2, l2)  # of the two unused ones, the older
        s.release(r0, l0.digest)  # unused now, and older than r3's
        assert seen == names(r2, l2) + names(r0, l0)
        assert held(s) == {(r1, l1.digest), (r3, l3.digest)}


def test_a_tag_resolved_again_neither_rebuilds_an_evicted_layer_nor_builds_a_kept_one_twice(
        registry, client, registries_conf, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="als.store")
    ref = f"{registry.host}/evict/two:esgz"
    files = {"a": os.urandom(2000), "b": os.urandom(2000)}
    built = [estargz_layer(io.BytesIO(images.files_tar({name: data})), chunk_size=CHUNK)
             for name, data in files.items()]
    push_image(client, parse_reference(ref), built)
    a, b = (l.digest for l in built)
    (o1, l1, _), (o2, l2, _) = one_layer_images(registry, client, "ttl-other", 2)
    # Two unused layers are kept. Both of ref's layers resolve together, so a bound of one could
    # evict a before the test's `use` of it, depending on which of the two finished first.
    with inprocess.store(tmp_path, registries_conf, evicting(2, "ttl = 1.0\n")) as s:
        s.layer(ref, a)
        s.use(ref, a)
        s.layer(ref, b)
        s.layer(o1, l1.digest)
        s.layer(o2, l2.digest)  # three unused layers: b's, looked up first, goes
        assert held(s) == {(ref, a), (o1, l1.digest), (o2, l2.digest)}
        time.sleep(1.2)
        mark = registry.mark()
        s.prepare(ref)  # past the TTL: the tag is resolved again
        s.resolutions()[ref].image.result(timeout=30)
        blobs = [x.uri for x in registry.accesses_since(mark) if "/blobs/" in x.uri]
        assert not [u for u in blobs if u.endswith(a) or u.endswith(b)], blobs  # config only, no layer
        assert caplog.text.count(f"layer {a}: ready") == 1
        [image] = [i for i in status.collect(s)["images"] if i["ref"] == ref]
        layers = {x["digest"]: x for x in image["layers"]}
        assert (layers[a]["state"], layers[a]["uses"], layers[b]["state"]) == ("ready", 1, "evicted")
        assert inprocess.read_file(s, s.layer(ref, b), "b") == files["b"]
        assert f"layer {b}: rebuilt from saved metadata" in caplog.text


def test_a_zstd_chunked_layer_keeps_its_computed_size_across_eviction(registry, client, registries_conf, tmp_path):
    """Podman writes no uncompressed size for zstd:chunked: it is computed with registry reads, once."""
    files = {"f": os.urandom(5000)}
    ref = f"{registry.host}/evict/zstd:podman"
    layer = images.push_zstd_files(client, ref, files, chunk_size=CHUNK, size_annotation=False)
    (other, l1, _), = one_layer_images(registry, client, "zstd-other", 1)
    with inprocess.store(tmp_path, registries_conf, evicting(1)) as s:
        seen = recorded(s)
        first = s.layer(ref, layer.digest)
        s.layer(other, l1.digest)
        assert (ref, layer.digest) in seen
        mark = registry.mark()
        again = s.layer(ref, layer.digest)
        assert registry.accesses_since(mark) == []
        assert again.diff_size == first.diff_size and again.info(layer.digest) == first.info(layer.digest)
        assert inprocess.read_file(s, again, "f") == files["f"]
