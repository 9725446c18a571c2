"""The store's FUSE file system, driven in-process over an in-memory registry: no mount, no registry process.

What the kernel would see of `<root>/<base64(ref)>/<digest>/{diff/,info,blob,use}`:
names, listings, attributes, contents, xattrs and errno values, for eStargz
and zstd:chunked layers the project's own writers make, and what a damaged
layer or a failing registry turns into (EIO, never a wrong byte).
"""

from __future__ import annotations

import base64
import errno
import functools
import gzip
import hashlib
import io
import json
import logging
import os
import stat

import pytest
import zstandard

from als.fuse.filesystem import ROOT
from als.fuse.session import WouldBlock
from tests.support import images, memstore, rawblob
from tests.support.memregistry import MANIFEST, RANGE
from tests.support.memstore import ref_dir

REF = "registry.test/als/tree:1"
TREE = images.TREE_ROOT
BIG = f"{TREE}/big.bin"  # 3 MiB + 17 bytes: four 1 MiB chunks
TYPE_BITS = {images.FILE: stat.S_IFREG, images.DIR: stat.S_IFDIR, images.SYMLINK: stat.S_IFLNK,
             images.CHAR: stat.S_IFCHR, images.BLOCK: stat.S_IFBLK, images.FIFO: stat.S_IFIFO}
WRITERS = {"estargz": memstore.estargz, "zstd:chunked": memstore.zstd_chunked}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=None)
def tree_layers(fmt: str) -> tuple:
    """The three tree layers (tests/support/images.py) in ``fmt``, 1 MiB chunks; built once per run."""
    return tuple(WRITERS[fmt](entries, chunk_size=images.CHUNK) for entries in images.tree_layer_entries())


def blob_of(layer) -> bytes:
    layer.blob.seek(0)
    return layer.blob.read()


def uncompressed(layer) -> bytes:
    """The layer's tar as a normal pull gets it, decompressed here independently of the store."""
    blob = blob_of(layer)
    if layer.media_type == "application/vnd.oci.image.layer.v1.tar+zstd":
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    return gzip.decompress(blob)


def toc_digest(layer) -> str:
    return next(v for k, v in layer.annotations.items() if k.endswith(("toc.digest", "manifest-checksum")))


@pytest.fixture(params=sorted(WRITERS))
def tree(request, mem):
    """The tree image pushed as ``REF`` in one format; yields its layers, bottom first."""
    layers = tree_layers(request.param)
    memstore.push(mem.registry, REF, list(layers))
    return layers


def entry_path(mem, layer, path: str) -> int:
    return mem.layer(REF, layer.digest, "diff", *path.split("/"))


# ---- the namespace ---------------------------------------------------------------------------
def test_the_root_lists_the_images_looked_up_and_an_image_its_layers(mem, tree):
    assert mem.names(ROOT) == []
    image = mem.walk(ref_dir(REF))
    assert mem.names(ROOT) == [ref_dir(REF)]
    assert stat.S_ISDIR(mem.getattr(image).mode)
    mem.layer(REF, tree[1].digest)
    assert tree[1].digest in mem.names(image)
    # All layers of the image resolve on the first lookup under it, and are listed once ready.
    for layer in tree:
        mem.layer(REF, layer.digest)
    assert sorted(mem.names(image)) == sorted(layer.digest for layer in tree)


def test_names_that_are_no_image_or_layer_do_not_exist(mem, tree):
    for name in ("not base64!", base64.b64encode(b"Not A Reference!").decode(), ".hidden"):
        with pytest.raises(OSError) as e:
            mem.walk(name)
        assert e.value.errno == errno.ENOENT, name
    missing = {"an unknown digest": (REF, sha(b"no such layer")),
               "not a digest": (REF, "sha256:xyz"),
               "an image the registry lacks": ("registry.test/als/absent:1", tree[0].digest),
               "use, which never exists": (REF, tree[0].digest, "use"),
               "a name beside diff": (REF, tree[0].digest, "other")}
    for what, (ref, *names) in missing.items():
        with pytest.raises(OSError) as e:
            mem.walk(ref_dir(ref), *names)
        assert e.value.errno == errno.ENOENT, what


def test_a_layer_directory_holds_diff_info_and_blob(mem, tree):
    layer = mem.layer(REF, tree[0].digest)
    assert sorted(mem.names(layer)) == ["blob", "diff", "info"]
    for name, size in (("info", None), ("blob", tree[0].size)):
        attr = mem.getattr(mem.lookup(layer, name).nodeid)
        assert attr.mode == stat.S_IFREG | 0o400, name
        assert size is None or attr.size == size, name
    diff = mem.getattr(mem.layer(REF, tree[0].digest, "diff"))
    assert stat.S_ISDIR(diff.mode)


def test_a_layer_is_the_same_by_blob_digest_and_by_toc_digest(mem, tree):
    by_toc = mem.layer(REF, toc_digest(tree[0]), "diff", TREE, "small.txt")  # first: Podman >= 5.1's name
    by_blob = mem.layer(REF, tree[0].digest, "diff", TREE, "small.txt")
    assert mem.read_all(by_toc) == mem.read_all(by_blob) == b"hello, tree\n"
    assert mem.getattr(by_toc).ino == mem.getattr(by_blob).ino  # one tree, two names


def test_info_by_blob_digest_is_what_containers_storage_checks_a_pull_against(mem, tree):
    for layer in tree:
        info = json.loads(mem.read_all(mem.layer(REF, layer.digest, "info")))
        tar = uncompressed(layer)
        assert info == {"compressed-diff-digest": layer.digest, "compressed-size": layer.size,
                        "diff-digest": sha(tar), "diff-size": len(tar),
                        "compression": 4 if layer.media_type.endswith("zstd") else 2}


def test_info_by_toc_digest_names_the_toc_and_the_diff_id_it_expects(mem, tree):
    layer = tree[2]
    tar = uncompressed(layer)
    info = json.loads(mem.read_all(mem.layer(REF, toc_digest(layer), "info")))
    assert info == {"toc-digest": toc_digest(layer), "compressed-size": layer.size, "diff-size": len(tar),
                    "compression": 4 if layer.media_type.endswith("zstd") else 2,
                    "flags": {"expected-layer-diffid": sha(tar)}}


def test_creating_use_counts_a_use_and_rmdir_releases_it(mem, tree):
    digest = tree[0].digest
    for n in (1, 2):
        e = mem.use(REF, digest)
        assert e is not None and e.errno == errno.ENOENT  # `use` is never created
        assert mem.store.uses(REF, digest) == n
    for n in (1, 0, 0):
        e = mem.release(REF, digest)
        assert e is not None and e.errno == errno.ENOENT  # nothing is ever removed
        assert mem.store.uses(REF, digest) == n
    mem.layer(REF, digest, "diff")  # still there


# ---- files, attributes, listings -------------------------------------------------------------
def test_every_entry_has_its_type_mode_owner_time_and_content(mem, tree):
    entries = images.tree_layer_entries()[0]
    by_path = {e.path: e for e in entries}
    links = {}  # hard link target -> how many names it has
    for e in entries:
        if e.type == images.HARDLINK:
            links[e.link] = links.get(e.link, 1) + 1
    for e in entries:
        source = by_path[e.link] if e.type == images.HARDLINK else e
        node = entry_path(mem, tree[0], e.path)
        attr = mem.getattr(node)
        assert (stat.S_IFMT(attr.mode), stat.S_IMODE(attr.mode)) == (TYPE_BITS[source.type], source.mode), e.path
        assert (attr.uid, attr.gid, attr.mtime) == (source.uid, source.gid, source.mtime), e.path
        if source.type == images.FILE:
            assert attr.size == len(source.data), e.path
            assert attr.nlink == links.get(source.path, 1), e.path
            assert mem.read_all(node) == source.data, e.path
        elif source.type == images.SYMLINK:
            assert mem.readlink(node) == source.link.encode() and attr.size == len(source.link.encode()), e.path
        elif source.type in (images.CHAR, images.BLOCK):
            assert attr.rdev == os.makedev(*source.dev), e.path


def test_hard_links_are_one_inode(mem, tree):
    names = [f"{TREE}/hl_a", f"{TREE}/hl_b", f"{TREE}/dir/hl_c"]
    inos = {mem.getattr(entry_path(mem, tree[0], p)).ino for p in names}
    assert len(inos) == 1


def test_reads_whole_partial_across_chunks_and_past_the_end(mem, tree):
    data = next(e.data for e in images.tree_layer_entries()[0] if e.path == BIG)
    node = entry_path(mem, tree[0], BIG)
    c = images.CHUNK
    for offset, size in ((0, 100), (c - 10, 20), (c - 1, 2 * c + 2), (3 * c, 100), (len(data) - 5, 4096),
                         (len(data), 10), (len(data) + 100, 10), (123_457, 1)):
        assert mem.read(node, offset, size) == data[offset:offset + size], (offset, size)
    assert mem.read(node, 0, len(data) + 10) == data  # one read over all four chunks
    assert mem.read_all(node) == data


def test_a_directory_lists_its_entries_with_their_inodes_and_types(mem, tree):
    top = entry_path(mem, tree[0], TREE)
    listing = mem.listing(top)
    assert [n for n, _, _ in listing[:2]] == [b".", b".."]
    expected = {e.name for e in images.tree_layer_entries()[0] if e.path.count("/") == 1}
    assert {n.decode() for n, _, _ in listing[2:]} == expected
    for name, ino, mode in listing[2:]:
        attr = mem.getattr(mem.lookup(top, name).nodeid)
        assert (ino, stat.S_IFMT(mode)) == (attr.ino, stat.S_IFMT(attr.mode)), name
    assert mem.lookup(top, "no such name").nodeid == 0  # a negative entry: the kernel may cache it
    with pytest.raises(OSError) as e:
        mem.listing(entry_path(mem, tree[0], f"{TREE}/small.txt"))
    assert e.value.errno == errno.ENOTDIR


def test_whiteouts_and_opaque_directories_are_in_overlay_form(mem, tree):
    gone = mem.getattr(entry_path(mem, tree[1], f"{TREE}/gone"))
    assert stat.S_ISCHR(gone.mode) and gone.rdev == 0  # a whiteout: a 0/0 character device
    dir_gone = mem.getattr(entry_path(mem, tree[2], f"{TREE}/dir_gone"))
    assert stat.S_ISCHR(dir_gone.mode) and dir_gone.rdev == 0
    opq = entry_path(mem, tree[1], f"{TREE}/opq")
    assert mem.getxattr(opq, "trusted.overlay.opaque") == b"y"
    assert b"trusted.overlay.opaque" in mem.listxattr(opq)
    assert mem.names(opq) == ["new"]  # the marker itself is not a file
    assert ".wh.gone" not in mem.names(entry_path(mem, tree[1], TREE))
    with pytest.raises(OSError) as e:
        mem.getxattr(entry_path(mem, tree[1], TREE), "trusted.overlay.opaque")
    assert e.value.errno == errno.ENODATA


def test_xattrs_are_served_exactly(mem, tree):
    f = entry_path(mem, tree[0], f"{TREE}/xattr_file")
    assert mem.listxattr(f) == [b"user.test"] and mem.getxattr(f, "user.test") == b"value"
    d = entry_path(mem, tree[0], f"{TREE}/xattr_dir")
    assert mem.getxattr(d, "user.dir") == b"d"
    with pytest.raises(OSError) as e:
        mem.getxattr(f, "user.other")
    assert e.value.errno == errno.ENODATA


def test_the_blob_file_is_the_compressed_blob(mem, tree):
    assert mem.read_all(mem.layer(REF, tree[2].digest, "blob")) == blob_of(tree[2])


# ---- damage and failure ----------------------------------------------------------------------
def test_a_tampered_chunk_is_eio_and_never_wrong_bytes(mem, tree, caplog):
    data = next(e.data for e in images.tree_layer_entries()[0] if e.path == BIG)
    node = entry_path(mem, tree[0], BIG)
    where = len(blob_of(tree[0])) // 4  # inside big.bin's chunks, which take most of the blob
    mem.registry.tamper(tree[0].digest, where)
    c = images.CHUNK
    failed = 0
    for offset in range(0, len(data), c):
        try:
            assert mem.read(node, offset, c) == data[offset:offset + c], offset
        except OSError as e:
            assert e.errno == errno.EIO
            failed += 1
    assert failed >= 1
    assert f"image {REF} layer {tree[0].digest} file /{BIG}: read failed" in caplog.text
    assert mem.read(entry_path(mem, tree[0], f"{TREE}/small.txt"), 0, 100) == b"hello, tree\n"


def test_a_well_formed_chunk_of_other_content_is_eio(mem):
    """Bytes that decompress cleanly but are not the file: only the chunk digests can tell."""
    ref = "registry.test/als/swapped:1"
    mine, other = (bytes([seed]) * 4 + os.urandom(1 << 20) for seed in (1, 2))
    stored = [memstore.estargz([images.Entry("f", data=d)], chunk_size=256 << 10, level=0) for d in (mine, other)]
    assert stored[0].size == stored[1].size
    memstore.push(mem.registry, ref, [stored[0]])
    node = mem.layer(ref, stored[0].digest, "diff", "f")  # resolved: its TOC is verified and read
    mem.registry.substitute(stored[0].digest, blob_of(stored[1]))
    with pytest.raises(OSError) as e:
        mem.read(node, 0, 4096)
    assert e.value.errno == errno.EIO


def test_a_tampered_blob_is_not_exported(mem, tree):
    blob = mem.layer(REF, tree[1].digest, "blob")
    mem.registry.tamper(tree[1].digest, 10)
    with pytest.raises(OSError) as e:
        mem.read(blob, 0, 4096)
    assert e.value.errno == errno.EIO


def test_a_registry_failure_mid_read_is_eio_and_a_later_read_succeeds(mem, tree):
    data = next(e.data for e in images.tree_layer_entries()[0] if e.path == BIG)
    node = entry_path(mem, tree[0], BIG)
    mem.registry.fail(RANGE, tree[0].digest, after=images.CHUNK // 2)  # half a chunk, then the body breaks
    with pytest.raises(OSError) as e:
        mem.read(node, 0, 3 * images.CHUNK)
    assert e.value.errno == errno.EIO
    assert mem.read(node, 0, len(data)) == data


def test_a_malformed_toc_is_declined_naming_the_layer(mem, caplog):
    caplog.set_level(logging.WARNING, logger="als.store")
    raw = rawblob.RawBlob()
    raw.file("f", b"content\n")
    built = raw.finish(b'{"version": 1, "entries": [')  # its digest matches: it is verified, then unreadable
    ref = "registry.test/als/malformed:1"
    memstore.push(mem.registry, ref, [built.layer])
    with pytest.raises(OSError) as e:
        mem.layer(ref, built.digest)
    assert e.value.errno == errno.EIO
    assert f"image {ref} layer {built.digest}: declined: " in caplog.text


def test_a_plain_gzip_layer_is_declined_and_the_others_served(mem, caplog):
    caplog.set_level(logging.WARNING, logger="als.store")
    ref = "registry.test/als/mixed:1"
    plain = memstore.plain_gzip([images.Entry("a", data=b"plain\n")])
    lazy = memstore.estargz([images.Entry("b", data=b"lazy\n")])
    memstore.push(mem.registry, ref, [plain, lazy])
    with pytest.raises(OSError) as e:
        mem.layer(ref, plain.digest)
    assert e.value.errno == errno.EIO
    assert f"image {ref} layer {plain.digest}: declined: no " in caplog.text
    assert mem.read_all(mem.layer(ref, lazy.digest, "diff", "b")) == b"lazy\n"


# ---- requests that must not wait ---------------------------------------------------------------
def test_a_lookup_that_would_wait_for_a_resolve_says_so_instead(mem, tree):
    hold = mem.registry.hold(MANIFEST)
    try:
        image = mem.walk(ref_dir(REF))  # starts resolving; the manifest request is held
        assert hold.arrived.wait(10)
        with pytest.raises(WouldBlock):
            mem.lookup(image, tree[0].digest, can_wait=False)
    finally:
        hold.release()
    assert mem.lookup(image, tree[0].digest, can_wait=True).nodeid > 0
    assert mem.lookup(image, tree[0].digest, can_wait=False).nodeid > 0  # resolved: answered at once


def test_a_read_that_would_wait_for_the_registry_says_so_and_fetches_nothing(mem, tree):
    node = entry_path(mem, tree[0], f"{TREE}/small.txt")
    before = len(mem.registry.served(RANGE))
    with pytest.raises(WouldBlock):
        mem.read(node, 0, 100, can_wait=False)
    assert len(mem.registry.served(RANGE)) == before
    assert mem.read(node, 0, 100) == b"hello, tree\n"
    assert mem.read(node, 0, 100, can_wait=False) == b"hello, tree\n"  # cached: answered at once
