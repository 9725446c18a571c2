"""Long runs, by hand only (`make soak` or `pytest -m soak -s`): hostile inputs, faults, kills, load.

Each prints its figures: inputs tried, faults injected, bytes verified, wrong
bytes served (which must be zero). They reuse the CI tests' machinery at a
larger scale and with the shipped default limits where the CI runs use
small ones. Scale with ALS_SOAK_SCALE (default 1).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import threading
import time

import pytest

from als.errors import FormatError
from als.formats import estargz
from als.tools.image import push_image
from als.layer.view import LayerView
from als.reference import parse_reference
from tests.support import faultproxy as fp
from tests.support import procstat
from tests.support.rawblob import RawBlob, sha, toc
from tests.support.store_process import StoreProcess, write_registries_conf
from tests.formats.test_fuzz import check_tree

pytestmark = pytest.mark.soak
SCALE = float(os.environ.get("ALS_SOAK_SCALE", "1"))

# ---- random hostile layers ------------------------------------------------------------------
HOSTILE_NAMES = ["..", "../x", "/abs", "a/../../b", "./", "/", "x" * 256, "a\x00b", ".wh..", ".wh.f0", "f0",
                 "f1", "d", "d/f0", "stargz.index.json", ".prefetch.landmark", "d/" * 300 + "deep", "é",
                 "\udcff", "a//b", "d/.wh..wh..opq", "l/x"]
HOSTILE_INTS = [-1, 0, 1, 7, 4096, 2**31, 2**63 - 1, 2**63, 2**64, True, "1", None, 1.5]
FIELDS = ["offset", "size", "chunkOffset", "chunkSize", "innerOffset", "mode", "uid", "devMajor"]
TYPES = ["reg", "dir", "symlink", "hardlink", "char", "block", "fifo", "chunk", "socket", ""]


def random_layer(rng: random.Random):
    """A valid small layer, then a few random lies in its TOC, footer or annotation."""
    b = RawBlob()
    entries = [{"name": "d", "type": "dir"}, {"name": "l", "type": "symlink", "linkName": "d"}]
    for i in range(rng.randint(1, 4)):
        data = rng.randbytes(rng.choice([1, 100, 5000, 70000]))
        if len(data) > 4000 and rng.random() < 0.5:  # two chunks
            half = len(data) // 2
            e = b.file(f"f{i}", data, chunkSize=half, chunkDigest=sha(data[:half]))
            e["offset"] = b.member(data[:half])
            entries += [e, {"type": "chunk", "offset": b.member(data[half:]), "chunkOffset": half,
                            "chunkDigest": sha(data[half:])}]
        else:
            entries.append(b.file(f"f{i}", data))
    entries.append({"name": "h", "type": "hardlink", "linkName": "f0"})
    kw = {}
    for _ in range(rng.randint(1, 4)):
        e = rng.choice(entries)
        what = rng.randrange(10)
        if what == 0:
            e["name"] = rng.choice(HOSTILE_NAMES)
        elif what == 1:
            e["type"] = rng.choice(TYPES)
        elif what in (2, 3):
            e[rng.choice(FIELDS)] = rng.choice(HOSTILE_INTS) if rng.random() < 0.5 else rng.randrange(1 << 20)
        elif what == 4:
            entries.insert(rng.randrange(len(entries) + 1), dict(e))
        elif what == 5:
            entries.append({"name": rng.choice(HOSTILE_NAMES), "type": rng.choice(["hardlink", "symlink"]),
                            "linkName": rng.choice(HOSTILE_NAMES)})
        elif what == 6:
            other = rng.choice(entries)
            if "chunkDigest" in other:
                e["chunkDigest"] = other["chunkDigest"]
        elif what == 7:
            e.pop(rng.choice(list(e)), None)
        elif what == 8:
            rng.shuffle(entries)
        else:
            kw = rng.choice([{"footer_offset": rng.randrange(1 << 16)}, {"toc_digest": sha(b"x")},
                             {"footer": rng.randbytes(51)}, {}])
    return b.finish(toc(entries), **kw), entries


def oracle(built, max_toc: int, max_entries: int, saved: dict):
    """What the store must do with a layer, computed in-process: None (decline) or its view.

    ``saved`` maps the TOC digests served so far to their views: the store keeps
    verified TOCs by digest and rightly uses them without reading the footer again.
    """
    if built.layer.annotations[estargz.TOC_DIGEST_ANNOTATION] != sha(built.toc_json):
        return None
    if sha(built.toc_json) in saved:
        return saved[sha(built.toc_json)]
    blob = built.blob
    try:
        offset, footer = estargz.parse_footer(blob[-51:], len(blob))
        parsed = estargz.parse_toc(blob[offset:len(blob) - footer], sha(built.toc_json), toc_offset=offset,
                                   max_toc_size=max_toc, max_entries=max_entries)
        view = LayerView(parsed.entries, max_nodes=max_entries + 65536)
    except FormatError:
        return None
    return None if view.unservable else view


def check_layer(store, ref, built, view, tally) -> None:
    diff = store.layer_dir(ref, built.digest) / "diff"
    if view is None:
        with pytest.raises(OSError) as e:
            os.stat(diff)
        assert e.value.errno == errno.EIO
        tally["declined"] += 1
        return
    check_tree(view)
    tally["served"] += 1
    stack = [(view.root, diff)]
    while stack:
        node, path = stack.pop()
        assert sorted(os.listdir(path)) == sorted(node.children)
        for name, child in node.children.items():
            p = path / name
            if child.is_dir:
                stack.append((child, p))
            elif child.is_reg and child.size:
                try:
                    got = p.read_bytes()
                except OSError as e:
                    assert e.errno == errno.EIO, e
                    tally["eio_reads"] += 1
                    continue
                assert len(got) == child.size
                for c in child.chunks:  # every byte served is vouched for by a digest
                    if hashlib.sha256(got[c.offset:c.offset + c.size]).hexdigest() != c.digest[7:]:
                        tally["wrong_bytes"] += c.size
                tally["bytes_verified"] += len(got)


def test_soak_random_hostile_layers(registry, client, registries_conf, tmp_path):
    """Hundreds of randomly lying layers: each declined, or served with only verified bytes."""
    config = "[fetch]\nbackground = false\n"
    rng = random.Random(20261129)
    tally = {"layers": 0, "declined": 0, "served": 0, "eio_reads": 0, "bytes_verified": 0, "wrong_bytes": 0}
    n = int(400 * SCALE)
    saved: dict = {}
    with StoreProcess(tmp_path, registries_conf=registries_conf, config=config, log_level="info") as store:
        pid = store.proc.pid
        base = procstat.rss_mib(pid)
        procstat.reset_peak(pid)
        t0 = time.monotonic()
        for i in range(n):
            built, _ = random_layer(rng)
            ref = f"{registry.host}/soak/h{i}:v1"
            push_image(client, parse_reference(ref), [built.layer])
            view = oracle(built, 64 << 20, estargz.MAX_TOC_ENTRIES, saved)
            check_layer(store, ref, built, view, tally)
            if view is not None:
                saved[sha(built.toc_json)] = view
            tally["layers"] += 1
        peak = procstat.peak_rss_mib(pid)
        assert store.proc.poll() is None
    print(f"\nrandom hostile layers: {tally} in {time.monotonic() - t0:.0f}s; daemon RSS {base:.0f} MiB, "
          f"peak {peak:.0f} MiB")
    assert tally["wrong_bytes"] == 0


def test_soak_a_dense_toc_at_the_default_limits(registry, client, registries_conf, tmp_path):
    """The most a TOC may cost with the shipped limits: 64 MiB of JSON, ~1M entries, compressed small."""
    b = RawBlob()
    entries = [{"name": f"{i:x}", "type": "dir"} for i in range(estargz.MAX_TOC_ENTRIES - 1)]
    doc = json.dumps(toc(entries), separators=(",", ":")).encode()
    built = b.finish(doc)
    over = RawBlob().finish(b'{"version":1,"entries":[' + b",".join([b"{}"] * (estargz.MAX_TOC_ENTRIES + 1))
                            + b"]}")
    ref, ref2 = f"{registry.host}/soak/dense:v1", f"{registry.host}/soak/over:v1"
    push_image(client, parse_reference(ref), [built.layer])
    push_image(client, parse_reference(ref2), [over.layer])
    with StoreProcess(tmp_path, registries_conf=registries_conf, config="[resolve]\ntimeout = 300.0\n") as s:
        pid = s.proc.pid
        base = procstat.rss_mib(pid)
        procstat.reset_peak(pid)
        t0 = time.monotonic()
        names = os.listdir(s.layer_dir(ref, built.digest) / "diff")
        took = time.monotonic() - t0
        peak = procstat.peak_rss_mib(pid)
        t0 = time.monotonic()
        with pytest.raises(OSError):
            os.stat(s.layer_dir(ref2, over.digest) / "diff")
        took2 = time.monotonic() - t0
    print(f"\ndense TOC: {len(doc) >> 20} MiB JSON in a {len(built.blob) >> 10} KiB blob, {len(names)} entries: "
          f"resolved in {took:.1f}s, daemon RSS {base:.0f} -> peak {peak:.0f} MiB; "
          f"{estargz.MAX_TOC_ENTRIES + 1} entries declined in {took2:.1f}s")
    assert len(names) == estargz.MAX_TOC_ENTRIES - 1


def test_soak_faults_under_load(registry, client, tmp_path):
    """Readers for minutes while the proxy flips between faults: only right bytes or bounded EIO."""
    from tests.system.test_faults import CONFIG, READ_BOUND, fresh
    duration = 240 * SCALE
    with fp.FaultProxy(registry.host, cut_after=3000, trickle_interval=0.2) as proxy:
        conf = write_registries_conf(tmp_path / "registries.conf", [registry.host, proxy.host])
        # A small cache, so that most reads need the registry and meet its faults.
        config = CONFIG + "[cache]\nmemory_bytes = 1048576\nmax_bytes = 2097152\n"
        with StoreProcess(tmp_path, registries_conf=conf, config=config, log_level="info") as store:
            images = [fresh(registry, client, proxy, chunks=48) for _ in range(6)]
            paths = [(store.layer_dir(ref, layer.digest) / "diff" / "file", data) for ref, layer, data in images]
            for p, _ in paths:
                p.stat()
            stop = threading.Event()
            lock = threading.Lock()
            examples: list = []  # (image, offset, size, got, wanted, first wrong byte, all zeros after it)
            t = {"reads": 0, "eio": 0, "other_errors": 0, "size_changed": 0, "short_reads": 0, "bytes_verified": 0, "wrong_bytes": 0, "max_read_s": 0.0,
                 "over_bound": 0, "mode_changes": 0}

            def read_loop(seed):
                rng = random.Random(seed)
                while not stop.is_set():
                    path, data = rng.choice(paths)
                    off = rng.randrange(len(data))
                    size = rng.choice([1, 4096, 65536, 200_000])
                    t0 = time.monotonic()
                    seen_size = len(data)
                    try:
                        fd = os.open(path, os.O_RDONLY)
                        try:
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                            got = os.pread(fd, size, off)
                            seen_size = os.fstat(fd).st_size
                        finally:
                            os.close(fd)
                        err = 0
                    except OSError as e:
                        got, err = b"", e.errno
                    took = time.monotonic() - t0
                    with lock:
                        t["reads"] += 1
                        t["max_read_s"] = max(t["max_read_s"], took)
                        t["over_bound"] += took > READ_BOUND
                        if err:
                            t["eio" if err == errno.EIO else "other_errors"] += 1
                        else:
                            t["bytes_verified"] += len(got)
                            want = data[off:off + size]
                            t["size_changed"] += seen_size != len(data)  # a short reply would shrink it
                            if got != want and len(got) < len(want) and got == want[:len(got)]:
                                # A page after the first failed under a fault: Linux returns what was
                                # read before it (the next read there gets EIO). Right bytes, fewer.
                                t["short_reads"] += 1
                            elif got != want:
                                t["wrong_bytes"] += len(got)
                                first = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b),
                                             min(len(got), len(want)))
                                examples.append((paths.index((path, data)), off, size, len(got), len(want),
                                                 first, got[first:].count(0) == len(got) - first))

            threads = [threading.Thread(target=read_loop, args=(i,), daemon=True) for i in range(24)]
            for th in threads:
                th.start()
            rng = random.Random(7)
            end = time.monotonic() + duration
            while time.monotonic() < end:
                proxy.set(rng.choice(fp.MODES), drop=rng.random() < 0.3)
                t["mode_changes"] += 1
                time.sleep(rng.uniform(0.3, 3.0))
                if rng.random() < 0.3:  # forget some cached chunks? not possible live: drop pages instead
                    proxy.set(fp.PASS)
                    time.sleep(rng.uniform(0.5, 2.0))
            proxy.set(fp.PASS, drop=True)
            stop.set()
            for th in threads:
                th.join(READ_BOUND + 30)
                assert not th.is_alive(), "a reader hung"
            for p, data in paths:  # once the registry behaves, everything reads right
                assert p.read_bytes() == data
                t["bytes_verified"] += len(data)
        faults = proxy.stats.faults
    print(f"\nfaults under load, {duration:.0f}s: faults injected {faults}, {t}")
    if examples:
        print("wrong reads (image, offset, size, got, wanted, first wrong byte, zeros after):", examples[:10])
    assert t["wrong_bytes"] == 0 and t["over_bound"] == 0 and t["other_errors"] == 0 and t["size_changed"] == 0


def test_soak_sigkill_loop(registry, client, registries_conf, tmp_path):
    from tests.system.test_crash import kill_rounds, verify_cost
    tally = kill_rounds(registry, client, tmp_path, registries_conf, rounds=int(100 * SCALE), files=4,
                        size=16 << 20, seed=99)
    print(f"\nSIGKILL soak: rounds {tally.rounds}, kills mid-write {tally.kills_mid_write}, entries damaged "
          f"{tally.damaged}, bytes verified {tally.bytes_verified}, reads failed under a kill "
          f"{tally.read_errors}, wrong bytes {tally.wrong_bytes}")
    print(verify_cost(tmp_path / "root" / "cache"))


def test_soak_many_readers_with_default_chunks(registry, client, registries_conf, tmp_path):
    from tests.system.test_concurrency import build, hammer
    chunk = 4 << 20
    images = build(registry, client, layers=4, size=12 * chunk, chunk=chunk, tag="soak")
    with StoreProcess(tmp_path, registries_conf=registries_conf, config="[fetch]\nbackground = false\n") as s:
        readers = int(400 * SCALE)
        res = hammer(s, registry, images, readers=readers, reads_each=6, chunk=chunk, limit=900)
    print(f"\n{readers} readers, 4 MiB chunks: {res}")
    assert res.wrong == 0 and res.errors == 0
