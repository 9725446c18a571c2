"""`als optimize` and the store's access recording, with a real registry, FUSE mount and Podman.

The claim tested end to end: the cold start of `python3 -c 'print(1)'` from
the `als optimize` output fetches fewer bytes, in fewer requests, than from
the plain `als convert` output (the registry's access log counts them).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from als.ops import control
from als.layer.access import OP_PROFILE, OP_RECORD
from als.formats import estargz
from tests.conftest import NO_BACKGROUND
from als.tools.podman import Podman
from tests.support.store_process import StoreProcess
from tests.support.alsrun import config_for, get_blob, get_json, read_toc, run_als, tar_of


@pytest.fixture(scope="module")
def small_image(registry, client):
    from als.tools.image import estargz_layer, push_image
    from als.reference import parse_reference
    import io
    tar = tar_of({"first": b"1\n", "second": b"2\n", "third": b"3\n", "unread": b"u\n"})
    layer = estargz_layer(io.BytesIO(tar))
    ref = f"{registry.host}/opt/small:esgz"
    push_image(client, parse_reference(ref), [layer], config_for([layer]))
    return ref, layer


def test_the_store_records_files_in_first_read_order(store, small_image):
    ref, layer = small_image
    diff = store.layer_dir(ref, layer.digest) / "diff"
    assert (diff / "data").is_dir()  # resolved
    assert control.request(store.root, OP_RECORD, enable=True, clear=True)["enabled"] is True
    try:
        for name in ("third", "first", "third", "second"):
            assert (diff / "data" / name).read_bytes()
        profile = control.request(store.root, OP_PROFILE)
    finally:
        control.request(store.root, OP_RECORD, enable=False, clear=True)
    assert profile["order"] == ["data/third", "data/first", "data/second"]
    [rec] = profile["layers"]
    assert (rec["ref"], rec["digest"], rec["index"]) == (ref, layer.digest, 0)
    # Off again: reads are not recorded.
    (diff / "data" / "unread").read_bytes()
    assert control.request(store.root, OP_PROFILE)["order"] == []


def test_optimize_reuses_a_profile_without_running_anything(registry, registries_conf, small_image, tmp_path):
    ref, _ = small_image
    profile = tmp_path / "profile"
    profile.write_text("data/second\ndata/first\n")
    res = run_als("optimize", "--prioritize", str(profile), ref, f"{registry.host}/opt/small:prio",
                  conf=registries_conf)
    assert res.returncode == 0, res.stderr
    [desc] = get_json(registry, "opt/small", "prio")["layers"]
    names = [e.name for e in read_toc(get_blob(registry, "opt/small", desc["digest"]), desc)]
    # Reconverted (an eStargz source is not kept by optimize), prioritized files first.
    assert names.index("data/second") < names.index("data/first") < names.index(estargz.PREFETCH_LANDMARK)
    assert names.index(estargz.PREFETCH_LANDMARK) < names.index("data/third")


def test_optimize_refuses_what_it_cannot_do(registry, registries_conf, small_image, tmp_path):
    ref, _ = small_image
    res = run_als("optimize", ref, f"{registry.host}/opt/small:x", conf=registries_conf)
    assert res.returncode == 1 and "needs a workload" in res.stderr
    res = run_als("optimize", ref, f"oci:{tmp_path / 'out'}", "--", "true", conf=registries_conf)
    assert res.returncode == 1 and "--work-ref" in res.stderr
    assert not (tmp_path / "out").exists()


def cold_start(tmp_path, registry, registries_conf, ref: str, digest: str, name: str) -> tuple[int, int]:
    """Bytes and requests of layer ``digest`` a first `podman run` of ``ref`` costs, through a fresh store."""
    (tmp_path / name).mkdir()
    with StoreProcess(tmp_path / name, registries_conf=registries_conf, config=NO_BACKGROUND) as store, \
            Podman(tmp_path / f"{name}-podman", additional_layer_store=store.mountpoint,
                   insecure_registries=[registry.host]) as podman:
        mark = registry.mark()
        assert podman.run("run", "--rm", ref, "python3", "-c", "print(1)").stdout.strip() == "1"
        hits = [a for a in registry.accesses_since(mark) if digest in a.uri]
    return sum(a.written for a in hits), len(hits)


@pytest.mark.slow
def test_optimized_image_cold_start_fetches_less_than_plain_convert(registry, client, registries_conf, tmp_path):
    from als.tools.image import gzip_layer, push_image
    from als.reference import parse_reference
    from tests.support import images
    src = f"{registry.host}/opt/python:gzip"
    layer = gzip_layer(images.python_rootfs_tar().read_bytes())
    push_image(client, parse_reference(src), [layer], config_for([layer]))
    plain, optimized = f"{registry.host}/opt/python:plain", f"{registry.host}/opt/python:optimized"
    res = run_als("convert", "--compression-level", "6", src, plain, conf=registries_conf)
    assert res.returncode == 0, res.stderr

    # The workload prints, then would sleep for ten minutes: --timeout stops it.
    profile = tmp_path / "profile.txt"
    mounts_before = open("/proc/mounts").read().count("als-optimize-")
    t0 = time.monotonic()
    res = run_als("optimize", "--compression-level", "6", "--timeout", "6", "--profile-out", str(profile),
                  "--work-dir", str(tmp_path), src, optimized, "--",
                  "python3", "-c", "import time; print(1, flush=True); time.sleep(600)", conf=registries_conf)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert elapsed < 120, f"optimize took {elapsed:.0f}s"
    assert res.stdout.strip().startswith(f"{optimized}@sha256:")
    assert open("/proc/mounts").read().count("als-optimize-") == mounts_before  # its store is unmounted
    assert not any(p.name.startswith("als-optimize-") for p in tmp_path.iterdir())  # and its work dir gone

    recorded = [l for l in profile.read_text().splitlines() if l and not l.startswith("#")]
    assert recorded[:2] == ["etc/passwd", "etc/group"]  # Podman reads them to set up the user
    assert "usr/bin/python3.11" in recorded and "usr/lib/x86_64-linux-gnu/libc.so.6" in recorded
    assert any(p.endswith(".pyc") for p in recorded)
    [odesc] = get_json(registry, "opt/python", "optimized")["layers"]
    names = [e.name for e in read_toc(get_blob(registry, "opt/python", odesc["digest"]), odesc)]
    landmark = names.index(estargz.PREFETCH_LANDMARK)
    assert set(recorded) <= set(names[:landmark])
    [pdesc] = get_json(registry, "opt/python", "plain")["layers"]

    plain_bytes, plain_requests = cold_start(tmp_path, registry, registries_conf, plain, pdesc["digest"], "plain")
    opt_bytes, opt_requests = cold_start(tmp_path, registry, registries_conf, optimized, odesc["digest"], "opt")
    report = (f"cold start of python3 -c 'print(1)': plain convert {plain_bytes} bytes in {plain_requests} "
              f"requests, als optimize {opt_bytes} bytes in {opt_requests} requests (layer {pdesc['size']} bytes)")
    print(report)
    (tmp_path.parent / "optimize-figures.json").write_text(json.dumps({
        "plain_bytes": plain_bytes, "plain_requests": plain_requests, "optimized_bytes": opt_bytes,
        "optimized_requests": opt_requests, "layer_bytes": pdesc["size"]}))
    assert opt_bytes < plain_bytes, report
    assert opt_requests < plain_requests, report
    assert os.path.exists(profile)
