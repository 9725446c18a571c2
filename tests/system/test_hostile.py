"""Hostile layers, crafted byte by byte, pushed to a real registry and served by a real mount.

Every layer here lies somewhere: names that climb out of the layer, paths
through symlinks, link games, impossible names, offsets and sizes out of
range, decompression bombs, huge TOCs that compress to nothing, footers
pointing anywhere, a TOC the manifest does not vouch for. For each, the store
must confine or reject the entry with a logged reason, or decline the layer
(EIO on `diff`), or fail the read with EIO; never expose anything outside
`diff/`, never create a file from a TOC name, keep its memory bounded (the
daemon's own VmHWM), and keep serving the honest layer next to them.

The unit tests in test_estargz.py and test_layer.py cover the parser and the
view in-process; these prove the same defences hold end to end.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import time
import uuid
from pathlib import Path

import pytest

from als.formats import estargz
from als.tools.image import push_image
from als.reference import parse_reference
from tests.support import images, procstat
from tests.support.rawblob import RawBlob, sha, toc, toc_tar, zeros_member
from tests.support.store_process import StoreProcess

MAX_TOC = 4 << 20  # small limits keep the CI run fast; the soak runs the defaults
MAX_ENTRIES = 50_000
CONFIG = f"""
[resolve]
timeout = 30.0
max_toc_size = {MAX_TOC}
max_toc_entries = {MAX_ENTRIES}
[fetch]
background = false
"""
CANARY = f"als-escape-{uuid.uuid4().hex[:12]}"  # a file no layer may ever create on the host
TRIED: list[str] = []  # hostile inputs tried, for the summary at the end


@pytest.fixture(scope="module")
def store(registries_conf, tmp_path_factory):
    with StoreProcess(tmp_path_factory.mktemp("hostile"), registries_conf=registries_conf, config=CONFIG) as s:
        yield s


@pytest.fixture(scope="module")
def honest(store, registry, client):
    """A normal eStargz layer next to the hostile ones; it must keep serving throughout."""
    files = {f"f{i}": os.urandom(100_000 + i) for i in range(6)}
    ref = f"{registry.host}/hostile/honest:v1"
    layer = images.push_files(client, ref, files, chunk_size=32 << 10)
    diff = store.layer_dir(ref, layer.digest) / "diff"
    assert (diff / "f0").read_bytes() == files["f0"]
    return diff, files


@pytest.fixture(scope="module")
def baseline(store, honest):
    """The daemon's memory before any hostile layer (peak reset to the current RSS)."""
    pid = store.proc.pid
    procstat.reset_peak(pid)
    return procstat.rss_mib(pid)


def push(registry, client, name: str, built) -> str:
    TRIED.append(name)
    ref = f"{registry.host}/hostile/{name}:v1"
    push_image(client, parse_reference(ref), [built.layer])
    return ref


def declined(store, ref: str, digest: str, reason: str) -> None:
    with pytest.raises(OSError) as e:
        os.stat(store.layer_dir(ref, digest) / "diff")
    assert e.value.errno == errno.EIO
    lines = [l for l in store.log().splitlines() if f"image {ref} layer {digest}: declined:" in l]
    assert lines, f"no decline logged for {ref}"
    assert reason in lines[-1], lines[-1]


def walk(diff: Path) -> dict[str, os.stat_result]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(diff):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            out[str(p.relative_to(diff))] = os.lstat(p)
    return out


def no_escape(store, ref: str, digest: str) -> None:
    """Nothing beside diff/, info and blob in the layer directory, nothing planted on the host."""
    d = store.layer_dir(ref, digest)
    assert sorted(os.listdir(d)) == ["blob", "diff", "info"]
    assert json.loads((d / "info").read_bytes())["compressed-diff-digest"] == digest
    for host in (Path("/tmp") / CANARY, Path("/") / CANARY, store.root / CANARY, store.workdir / CANARY,
                 store.mountpoint.parent / CANARY):
        assert not host.exists(), host


# ---- confined or rejected entries: the layer serves, the bad entries do not --------------------
def test_names_climbing_out_are_confined_with_a_logged_reason(store, registry, client, baseline):
    b = RawBlob()
    data = b"confined\n"
    entries = [
        b.file(f"../../../../tmp/{CANARY}", data),
        b.file(f"/{CANARY}-abs", data),
        b.file(f"a/../../../{CANARY}-mid", data),
        {"name": f"../{CANARY}-link", "type": "hardlink", "linkName": f"../../tmp/{CANARY}"},
        {"name": "abs-symlink", "type": "symlink", "linkName": "/etc/shadow"},
    ]
    built = b.finish(toc(entries))
    ref = push(registry, client, "climb", built)
    diff = store.layer_dir(ref, built.digest) / "diff"
    tree = walk(diff)
    assert set(tree) == {"tmp", f"tmp/{CANARY}", f"{CANARY}-abs", f"{CANARY}-mid", f"{CANARY}-link",
                         "abs-symlink"}
    assert (diff / "tmp" / CANARY).read_bytes() == data and (diff / f"{CANARY}-mid").read_bytes() == data
    assert tree[f"{CANARY}-link"].st_ino == tree[f"tmp/{CANARY}"].st_ino and tree[f"tmp/{CANARY}"].st_nlink == 2
    assert os.readlink(diff / "abs-symlink") == "/etc/shadow"  # a value, never followed by the store
    log = store.log()
    assert f"layer {built.digest}: TOC entry 0 '../../../../tmp/{CANARY}'" in log
    assert "climbs above the layer root with '..'; confined to" in log
    no_escape(store, ref, built.digest)


def test_paths_through_symlinks_links_and_replacements_follow_tar_rules_or_are_rejected(
        store, registry, client, baseline):
    b = RawBlob()
    one, two, kept = b"first\n", b"second\n", b"kept\n"
    entries = [
        {"name": "etc", "type": "symlink", "linkName": "/etc"},
        b.file("etc/passwd", b"root::0:0::/:/bin/sh\n"),  # through a symlink: rejected
        b.file("f", one), b.file("f", two),  # duplicate: the later wins
        {"name": "d", "type": "dir"}, b.file("d/inner", kept),
        {"name": "d", "type": "reg"},  # a directory replaced by a file
        {"name": "h-gone", "type": "hardlink", "linkName": "d/inner"},  # to what the replacement removed
        {"name": "h-later", "type": "hardlink", "linkName": "later"},  # to an entry not seen yet
        {"name": "h-missing", "type": "hardlink", "linkName": "nowhere"},
        {"name": "h-dir", "type": "hardlink", "linkName": "etc2"},
        {"name": "etc2", "type": "dir"},
        b.file("later", kept),
        {"name": "h-ok", "type": "hardlink", "linkName": "later"},
        {"name": ".wh..", "type": "reg"}, {"name": "etc2/.wh...", "type": "reg"},  # whiteouts of . and ..
        {"name": ".wh.gone", "type": "reg"},
    ]
    built = b.finish(toc(entries))
    ref = push(registry, client, "links", built)
    diff = store.layer_dir(ref, built.digest) / "diff"
    tree = walk(diff)
    assert set(tree) == {"etc", "f", "d", "etc2", "later", "h-ok", "gone"}, sorted(tree)
    assert stat.S_ISLNK(tree["etc"].st_mode) and sorted(os.listdir(diff)).count("etc") == 1
    assert (diff / "f").read_bytes() == two and tree["f"].st_nlink == 1
    assert stat.S_ISREG(tree["d"].st_mode) and tree["d"].st_size == 0
    assert tree["h-ok"].st_ino == tree["later"].st_ino and tree["later"].st_nlink == 2
    assert stat.S_ISCHR(tree["gone"].st_mode) and tree["gone"].st_rdev == 0
    assert os.listdir(diff / "etc2") == []
    assert (diff / "h-ok").read_bytes() == kept
    log = store.log()
    for name, why in [("etc/passwd", "a parent path component is not a directory"),
                      ("h-gone", "which is not an earlier entry"), ("h-later", "which is not an earlier entry"),
                      ("h-missing", "which is not an earlier entry"), ("h-dir", "which is not an earlier entry"),
                      (".wh..", "a whiteout of '.' or '..'"), ("etc2/.wh...", "a whiteout of '.' or '..'")]:
        lines = [l for l in log.splitlines() if f"layer {built.digest}: ignoring TOC entry '{name}': " in l]
        assert lines and why in lines[0], name
    no_escape(store, ref, built.digest)


# ---- declined layers: the layer answers EIO and Podman pulls it normally ---------------------
def _one_file(**fields):
    b = RawBlob()
    return b, [b.file("f", b"data", **fields)]


def _long_path():
    b = RawBlob()
    return b, [b.file("/".join(["d" * 200] * 21), b"x")]


def _deep_tree():
    b = RawBlob()
    # 60 entries, each ~2000 directories deep and all distinct: a small TOC, a huge tree
    return b, [{"name": f"t{i}/" + "/".join(["a"] * 2000), "type": "dir"} for i in range(60)]


def _overlap():
    b = RawBlob()
    e = b.file("f", b"0123456789", chunkSize=6)
    return b, [e, {"type": "chunk", "offset": e["offset"], "chunkOffset": 4, "chunkDigest": sha(b"x")}]


CASES = {
    "nul-name": (lambda: (RawBlob(), [{"name": "a\x00b", "type": "dir"}]), "contains a NUL byte"),
    "long-component": (lambda: (RawBlob(), [{"name": "x" * 256, "type": "dir"}]), "longer than 255 bytes"),
    "long-path": (_long_path, "longer than 4095 bytes"),
    "long-symlink": (lambda: (RawBlob(), [{"name": "l", "type": "symlink", "linkName": "a/" * 2100}]),
                     "symlink target is longer than 4095"),
    "huge-xattr": (lambda: (RawBlob(), [{"name": "d", "type": "dir", "xattrs": {
        "user.big": __import__("base64").b64encode(bytes(70_000)).decode()}}]), "longer than 65536 bytes"),
    "negative-offset": (lambda: _one_file(offset=-1), "out of range"),
    "offset-past-toc": (lambda: _one_file(offset=1 << 40), "outside the data before the TOC"),
    "size-past-chunks": (lambda: _one_file(size=1 << 40, chunkSize=4), f"chunks cover 4 bytes of {1 << 40}"),
    "chunk-past-size": (lambda: _one_file(chunkOffset=5), "lies beyond the file size"),
    "overlapping-chunks": (_overlap, "chunks overlap"),
    "huge-declared-chunk": (lambda: _one_file(size=1 << 30, chunkSize=0), "over the limits"),
    "huge-inner-offset": (lambda: _one_file(innerOffset=1 << 40), "over the limits"),
    "bool-offset": (lambda: _one_file(offset=True), "must be a int"),
    "huge-uid": (lambda: (RawBlob(), [{"name": "d", "type": "dir", "uid": (1 << 63) - 1}]), "out of range"),
    "huge-device": (lambda: (RawBlob(), [{"name": "c", "type": "char", "devMajor": 4096, "devMinor": 1}]),
                    "device 4096:1 is out of range"),
    "deep-tree": (_deep_tree, f"more than {MAX_ENTRIES + 65536} nodes"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_impossible_tocs_decline_the_layer(case, store, registry, client, baseline):
    make, reason = CASES[case]
    b, entries = make()
    built = b.finish(toc(entries))
    ref = push(registry, client, case, built)
    declined(store, ref, built.digest, reason)


def test_a_toc_the_manifest_does_not_vouch_for_is_declined(store, registry, client, baseline):
    b = RawBlob()
    built = b.finish(toc([b.file("f", b"evil")]), toc_digest=sha(b"some other TOC"))
    ref = push(registry, client, "toc-mismatch", built)
    declined(store, ref, built.digest, "the manifest says " + sha(b"some other TOC"))


@pytest.mark.parametrize("where", ["past-the-end", "into-a-file", "zero", "garbage-footer", "legacy-far"])
def test_footers_pointing_anywhere_decline_the_layer(where, store, registry, client, baseline):
    b = RawBlob()
    entry = b.file("f", b"payload" * 100)
    kw, reason = {
        "past-the-end": ({"footer_offset": 1 << 50}, "outside the"),
        "into-a-file": ({"footer_offset": entry["offset"]}, "TOC member does not start with a tar header"),
        "zero": ({"footer_offset": 0}, "TOC member does not start with a tar header"),
        "garbage-footer": ({"footer": os.urandom(51)}, "not an eStargz layer"),
        "legacy-far": ({"footer": estargz.make_legacy_footer(1 << 40)}, "outside the"),
    }[where]
    built = b.finish(toc([entry]), **kw)
    ref = push(registry, client, f"footer-{where}", built)
    declined(store, ref, built.digest, reason)


def test_a_toc_claiming_hundreds_of_mb_is_declined_without_inflating_it(store, registry, client, baseline):
    b = RawBlob()
    claimed = 300 << 20
    header = toc_tar(b"", declared=claimed)[:512]
    member = zeros_member(claimed, prefix=header)  # really inflates to 300 MiB of zeros
    assert len(member) < 1 << 20
    built = b.finish(b'{"version":1,"entries":[]}', toc_member=member)
    ref = push(registry, client, "toc-300mb", built)
    t0 = time.monotonic()
    declined(store, ref, built.digest, f"TOC of {claimed} bytes exceeds the limit of {MAX_TOC}")
    assert time.monotonic() - t0 < 10


def test_a_toc_of_too_many_tiny_entries_is_declined(store, registry, client, baseline):
    b = RawBlob()
    doc = b'{"version":1,"entries":[' + b",".join([b"{}"] * (MAX_ENTRIES + 1)) + b"]}"
    built = b.finish(doc)
    assert len(built.blob) < 64 << 10
    ref = push(registry, client, "toc-entries", built)
    declined(store, ref, built.digest, f"TOC has {MAX_ENTRIES + 1} entries, over the limit of {MAX_ENTRIES}")


def test_a_dense_toc_at_the_size_limit_resolves_in_bounded_time_and_memory(store, registry, client, baseline):
    """Just under both limits: the most a TOC may cost. It must resolve, quickly enough, and the
    daemon's peak memory stays within ~25x the TOC size (JSON objects) plus the tree."""
    b = RawBlob()
    pad = "p" * max(MAX_TOC // MAX_ENTRIES - 40, 1)
    entries = [{"name": f"d{i}{pad}", "type": "dir"} for i in range(MAX_ENTRIES - 1)]
    doc = json.dumps(toc(entries), separators=(",", ":")).encode()
    assert MAX_TOC // 2 < len(doc) <= MAX_TOC
    built = b.finish(doc)
    ref = push(registry, client, "toc-dense", built)
    pid = store.proc.pid
    before = procstat.rss_mib(pid)
    t0 = time.monotonic()
    assert len(os.listdir(store.layer_dir(ref, built.digest) / "diff")) == MAX_ENTRIES - 1
    took = time.monotonic() - t0
    peak = procstat.peak_rss_mib(pid)
    print(f"\ndense TOC: {len(doc) >> 10} KiB, {MAX_ENTRIES - 1} entries: {took:.1f}s, "
          f"daemon peak {peak:.0f} MiB (from {before:.0f} MiB)")
    assert took < 30
    assert peak - before < 25 * MAX_TOC / 2**20 + 150


# ---- read-time lies: the layer resolves, the read fails with EIO or returns the right bytes ------
def test_decompression_bomb_chunks_inflate_only_what_is_declared(store, registry, client, baseline):
    b = RawBlob()
    size = 1 << 20
    bomb = zeros_member(1 << 30)  # 1 GiB of zeros in about 1 MiB
    honest_off = b.raw(bomb)
    lying_off = b.raw(bomb)
    entries = [
        {"name": "zeros", "type": "reg", "size": size, "offset": honest_off, "chunkDigest": sha(bytes(size))},
        {"name": "lies", "type": "reg", "size": size, "offset": lying_off, "chunkDigest": sha(b"other")},
    ]
    built = b.finish(toc(entries))
    assert len(built.blob) < 4 << 20
    ref = push(registry, client, "bomb", built)
    pid = store.proc.pid
    before = procstat.rss_mib(pid)
    diff = store.layer_dir(ref, built.digest) / "diff"
    assert hashlib.sha256((diff / "zeros").read_bytes()).digest() == hashlib.sha256(bytes(size)).digest()
    with pytest.raises(OSError) as e:
        (diff / "lies").read_bytes()
    assert e.value.errno == errno.EIO
    assert procstat.peak_rss_mib(pid) - before < 100  # inflating 1 GiB would show
    assert f"layer {built.digest} file /lies: read failed" in store.log()


def test_lying_chunk_digests_and_offsets_read_as_eio(store, registry, client, baseline):
    b = RawBlob()
    real, other = os.urandom(5000), os.urandom(5000)
    entries = [
        b.file("good", real),
        b.file("wrong-digest", other, chunkDigest=sha(b"not it")),
        {**b.file("points-elsewhere", other), "offset": 0},  # the bytes of "good", the digest of "other"
        {"name": "short", "type": "reg", "size": 6000, "offset": b.member(real), "chunkDigest": sha(real)},
    ]
    built = b.finish(toc(entries))
    ref = push(registry, client, "lying-chunks", built)
    diff = store.layer_dir(ref, built.digest) / "diff"
    assert (diff / "good").read_bytes() == real
    for name in ("wrong-digest", "points-elsewhere", "short"):
        with pytest.raises(OSError) as e:
            (diff / name).read_bytes()
        assert e.value.errno == errno.EIO, name
        assert f"layer {built.digest} file /{name}: read failed" in store.log()


# ---- after all of them -------------------------------------------------------------------------
def test_after_all_that_the_honest_layer_serves_and_nothing_leaked(store, honest, baseline):
    diff, files = honest
    assert store.proc.poll() is None, "the daemon died"
    for name, data in files.items():
        with open(diff / name, "rb") as f:
            f.seek(len(data) // 2)
            assert f.read() == data[len(data) // 2:]
    pid = store.proc.pid
    peak = procstat.peak_rss_mib(pid)
    print(f"\nhostile inputs tried: {len(TRIED)}; daemon RSS {baseline:.0f} MiB before, peak {peak:.0f} MiB "
          f"across all of them, {procstat.threads(pid)} threads now")
    assert peak - baseline < 25 * MAX_TOC / 2**20 + 200
    # the store's files are named by digests only: no TOC name was ever used as a path
    names = {p.name for p in store.root.rglob("*")}
    assert not any(CANARY in n for n in names)
    allowed = {"cache", "packs", "state", "blobs", "tocs", "refs", "als.sock",
               "rootfs", "empty", "rootfs.json",  # `als mount`: its records and the empty bottom layer
               "ids", "fuse-connections.json", "fuse-holder.sock"}  # what a successor takes over
    odd = {n for n in names if n not in allowed and not all(c in "0123456789abcdef" for c in n)
           and not re.fullmatch(r"[0-9a-f]{16}\.(pack|index)", n)}  # the chunk cache's packs
    assert not odd, odd
