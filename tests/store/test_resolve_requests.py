"""What a cold resolve asks a real registry, and in which order.

The store (built in-process, tests/support/inprocess.py) reaches a real
docker-registry through an HTTP front that records every request and can
hold or refuse one (tests/support/httpfront.py). A resolve asks for the
manifest, the config and one range per layer (the tail that holds its TOC),
and the tails do not wait for the config: they are under way before the
config is answered. The layer looked up first has its tail asked for before
the manifest is answered (a suffix range: its size is not known yet).
"""

from __future__ import annotations

import io
import json
import random
import threading
import time


from als.reference import parse_reference
from als.tools import image as alsimage
from tests.support import images, inprocess
from tests.support.httpfront import Front, Seen
from tests.support.registry import RegistryProcess
from tests.support.regtest import fast_client, hermetic_env, insecure, write_conf  # noqa: F401

# No background fetch, no prediction: only what resolving needs reaches the registry.
CONFIG = "[fetch]\nbackground = false\npredict = false\n"
HOLD = 5.0  # seconds the front holds the config answer waiting for the tails (it never needs them all)


def push(reg: RegistryProcess, tmp_path, ref: str, n_layers: int) -> tuple[list[alsimage.BuiltLayer], str]:
    """An eStargz image of ``n_layers`` small layers (each TOC within the tail read); its config digest."""
    layers = []
    for i in range(n_layers):
        entries = [images.Entry(f"l{i}/f{j}", data=random.Random(f"{ref} {i} {j}").randbytes(20_000))
                   for j in range(3)]
        layers.append(alsimage.estargz_layer(io.BytesIO(images.layer_tar(entries)), chunk_size=64 << 10))
    with fast_client(write_conf(tmp_path, insecure(reg.host))) as c:
        alsimage.push_image(c, parse_reference(f"{reg.host}/{ref}"), layers)
        manifest = json.loads(c.get_manifest(parse_reference(f"{reg.host}/{ref}")).data)
    return layers, manifest["config"]["digest"]


def front_conf(tmp_path, front: Front):
    d = tmp_path / "front"
    d.mkdir(exist_ok=True)
    (d / "registries.conf").write_text(insecure(front.host))
    return d / "registries.conf"


def work(tmp_path):
    (tmp_path / "s").mkdir()
    return tmp_path / "s"


def gets(front: Front, digest: str) -> list[Seen]:
    return front.seen(lambda s: s.method == "GET" and s.path.endswith(f"/blobs/{digest}"))


def test_a_cold_resolve_asks_for_the_manifest_the_config_and_one_tail_per_layer(registry, tmp_path):
    layers, config_digest = push(registry, tmp_path, "resolve/counted:1", 3)
    with Front(registry.host) as front, inprocess.store(work(tmp_path), front_conf(tmp_path, front), CONFIG) as s:
        ref = f"{front.host}/resolve/counted:1"
        for i, layer in enumerate(layers):
            assert s.layer(ref, layer.digest).view.lookup([f"l{i}", "f0"]) is not None
        assert len(front.seen(lambda r: "/manifests/" in r.path)) == 1
        assert len(gets(front, config_digest)) == 1
        for i, layer in enumerate(layers):
            reads = gets(front, layer.digest)
            assert len(reads) == 1, [r.headers.get("Range") for r in reads]
            # The first one looked up: its tail before the manifest; the others once it is in.
            want = "bytes=-524288" if i == 0 else f"bytes={max(layer.size - 524288, 0)}-{layer.size - 1}"
            assert reads[0].headers.get("Range") == want


def test_the_tails_are_read_while_the_config_is_fetched(registry, tmp_path):
    layers, config_digest = push(registry, tmp_path, "resolve/overlap:1", 2)
    tails_seen = threading.Event()
    held: list[bool] = []

    def hook(seen: Seen):
        if seen.path.endswith(f"/blobs/{config_digest}"):
            # Answer the config only once every layer's tail read has arrived (or HOLD has passed).
            held.append(tails_seen.wait(HOLD))
        elif all(gets(front, layer.digest) for layer in layers):
            tails_seen.set()
        return None  # forwarded to the registry

    with Front(registry.host, hook=hook) as front, \
            inprocess.store(work(tmp_path), front_conf(tmp_path, front), CONFIG) as s:
        ref = f"{front.host}/resolve/overlap:1"
        for layer in layers:
            s.layer(ref, layer.digest)
        assert held == [True], "the config was answered before the layers' tails were asked for"
        assert all(len(gets(front, layer.digest)) == 1 for layer in layers)


def test_a_failed_read_ahead_is_read_again_by_the_build(registry, tmp_path):
    layers, _ = push(registry, tmp_path, "resolve/refused:1", 1)
    refused = []

    def hook(seen: Seen):
        if seen.headers.get("Range") and not refused:
            refused.append(seen.path)
            return 404, {"Content-Type": "application/json"}, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}'
        return None

    with Front(registry.host, hook=hook) as front, \
            inprocess.store(work(tmp_path), front_conf(tmp_path, front), CONFIG) as s:
        layer = s.layer(f"{front.host}/resolve/refused:1", layers[0].digest)
        assert layer.view.lookup(["l0", "f0"]) is not None
        assert refused and len(gets(front, layers[0].digest)) == 2


def test_the_first_layer_s_tail_is_read_while_the_manifest_is_fetched(registry, tmp_path):
    layers, _ = push(registry, tmp_path, "resolve/guessed:1", 2)
    tail_seen = threading.Event()
    held: list[bool] = []

    def hook(seen: Seen):
        if "/manifests/" in seen.path:
            held.append(tail_seen.wait(HOLD))  # answered once the first layer's tail is asked for
        elif seen.path.endswith(f"/blobs/{layers[0].digest}"):
            tail_seen.set()
        return None

    with Front(registry.host, hook=hook) as front, \
            inprocess.store(work(tmp_path), front_conf(tmp_path, front), CONFIG) as s:
        ref = f"{front.host}/resolve/guessed:1"
        assert s.layer(ref, layers[0].digest).view.lookup(["l0", "f0"]) is not None
        assert s.layer(ref, layers[1].digest).view.lookup(["l1", "f0"]) is not None
        assert held == [True], "the manifest was answered before the first layer's tail was asked for"
        assert [len(gets(front, layer.digest)) for layer in layers] == [1, 1]


def test_a_layer_named_by_its_toc_digest_costs_one_wasted_request_then_none(registry, tmp_path):
    """Podman >= 5.1 names a layer by its TOC digest, which is no blob: guessed once, then not again."""
    first, _ = push(registry, tmp_path, "resolve/toc1:1", 1)
    second, _ = push(registry, tmp_path, "resolve/toc2:1", 1)
    with Front(registry.host) as front, inprocess.store(work(tmp_path), front_conf(tmp_path, front), CONFIG) as s:
        for name, layer in (("toc1", first[0]), ("toc2", second[0])):
            toc_digest = layer.annotations["containerd.io/snapshot/stargz/toc.digest"]
            assert s.layer(f"{front.host}/resolve/{name}:1", toc_digest).desc.digest == layer.digest
            # The refused guess may still be on its way back: bounded, it ends guessing.
            deadline = time.monotonic() + 5
            while s.resolver.builder.guessing and time.monotonic() < deadline:
                time.sleep(0.01)
        assert [len(gets(front, first[0].annotations["containerd.io/snapshot/stargz/toc.digest"])),
                len(gets(front, second[0].annotations["containerd.io/snapshot/stargz/toc.digest"]))] == [1, 0]
        assert [len(gets(front, layer.digest)) for layer in (first[0], second[0])] == [1, 1]


def test_the_layers_toc_is_read_and_parsed_before_the_config_is_in(registry, tmp_path):
    """A layer is built while its image's config is fetched: only its `info` needs the config."""
    layers, config_digest = push(registry, tmp_path, "resolve/prebuilt:1", 2)
    where = work(tmp_path)
    saved = [where / "root" / "state" / "tocs" / layer.annotations[
        "containerd.io/snapshot/stargz/toc.digest"].split(":")[1] for layer in layers]
    held: list[bool] = []

    def hook(seen: Seen):
        if seen.path.endswith(f"/blobs/{config_digest}"):
            deadline = time.monotonic() + HOLD  # answered once both TOCs are verified and saved
            while not all(p.exists() for p in saved) and time.monotonic() < deadline:
                time.sleep(0.01)
            held.append(all(p.exists() for p in saved))
        return None

    with Front(registry.host, hook=hook) as front, \
            inprocess.store(where, front_conf(tmp_path, front), CONFIG) as s:
        ref = f"{front.host}/resolve/prebuilt:1"
        for i, layer in enumerate(layers):
            got = s.layer(ref, layer.digest)
            assert got.view.lookup([f"l{i}", "f0"]) is not None
            assert json.loads(got.info(layer.digest))["diff-digest"] == layer.diff_id  # from the config
        assert held == [True], "the config was answered before the layers' TOCs were parsed"
