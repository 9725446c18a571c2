"""The layer view: overlay conversion, hard links, tar replacement rules, confinement."""

import os
import stat

from als.formats import toc as T
from als.layer.view import LayerView, OPAQUE_XATTRS


def E(name, type=T.REG, **kw):
    return T.Entry(name=name, type=type, **kw)


def chunk(offset, size, start):
    return T.Chunk(offset=offset, size=size, blob_start=start, blob_end=start + 10, digest="sha256:" + "0" * 64)


def test_types_modes_and_devices():
    v = LayerView([
        E("", T.DIR, mode=0o755),
        E("bin", T.DIR, mode=0o755),
        E("bin/su", mode=0o4755, uid=0, size=5, chunks=[chunk(0, 5, 0)]),
        E("tmp", T.DIR, mode=0o1777),
        E("srv", T.DIR, mode=0o2775, uid=1000, gid=1001, mtime=1234),
        E("dev", T.DIR),
        E("dev/null", T.CHAR, mode=0o666, devmajor=1, devminor=3),
        E("dev/loop0", T.BLOCK, mode=0o660, devmajor=7, devminor=0),
        E("run/fifo", T.FIFO, mode=0o600),
        E("link", T.SYMLINK, linkname="bin/su"),
    ])
    assert v.lookup(["bin", "su"]).mode == stat.S_IFREG | 0o4755
    assert v.lookup(["tmp"]).mode == stat.S_IFDIR | 0o1777
    srv = v.lookup(["srv"])
    assert (srv.mode, srv.uid, srv.gid, srv.mtime) == (stat.S_IFDIR | 0o2775, 1000, 1001, 1234)
    null = v.lookup(["dev", "null"])
    assert stat.S_ISCHR(null.mode) and os.major(null.rdev) == 1 and os.minor(null.rdev) == 3
    assert os.major(v.lookup(["dev", "loop0"]).rdev) == 7
    assert stat.S_ISFIFO(v.lookup(["run", "fifo"]).mode)
    assert v.lookup(["run"]).is_dir  # created implicitly, like tar does
    link = v.lookup(["link"])
    assert stat.S_ISLNK(link.mode) and link.target == "bin/su" and link.size == 6
    assert v.root.nlink == 2 + 5  # bin tmp srv dev run
    assert len({n.ino for n in (v.root, srv, null, link)}) == 4


def test_hard_links_share_a_node_and_count():
    v = LayerView([E("a", size=1, chunks=[chunk(0, 1, 0)]), E("b", T.HARDLINK, linkname="a"),
                   E("d/c", T.HARDLINK, linkname="a")])
    a, b, c = v.lookup(["a"]), v.lookup(["b"]), v.lookup(["d", "c"])
    assert a is b is c and a.nlink == 3


def test_whiteouts_and_opaque_dirs_in_overlay_form():
    v = LayerView([E("gone.wh", size=0), E(".wh.gone"), E("d", T.DIR), E("d/.wh..wh..opq"), E("d/new"),
                   E("kept"), E(".wh.kept")])
    wh = v.lookup(["gone"])
    assert stat.S_ISCHR(wh.mode) and wh.rdev == 0
    assert v.lookup([".wh.gone"]) is None and v.lookup(["d", ".wh..wh..opq"]) is None
    assert v.lookup(["d"]).xattrs == OPAQUE_XATTRS
    assert stat.S_ISREG(v.lookup(["kept"]).mode)  # a real entry wins over its whiteout


def test_landmarks_and_toc_hidden_at_root_only():
    v = LayerView([E(".prefetch.landmark", size=1), E(".no.prefetch.landmark"), E("stargz.index.json"),
                   E("sub/.prefetch.landmark")])
    assert sorted(v.root.children) == ["sub"]
    assert v.lookup(["sub", ".prefetch.landmark"]) is not None


def test_later_entries_replace_earlier_ones_like_tar():
    v = LayerView([E("x", T.DIR, mode=0o700), E("x/child"), E("x", T.DIR, mode=0o755),
                   E("y", T.DIR), E("y/old"), E("y", T.SYMLINK, linkname="/etc")])
    x = v.lookup(["x"])
    assert x.mode & 0o777 == 0o755 and "child" in x.children  # dir over dir keeps contents
    assert stat.S_ISLNK(v.lookup(["y"]).mode) and v.lookup(["y", "old"]) is None


def test_paths_through_symlinks_and_bad_hard_links_are_rejected():
    v = LayerView([E("etc", T.SYMLINK, linkname="/etc"), E("etc/passwd", size=3),
                   E("h", T.HARDLINK, linkname="missing"), E("d", T.DIR), E("hd", T.HARDLINK, linkname="d")])
    assert v.lookup(["etc", "passwd"]) is None
    assert v.lookup(["h"]) is None and v.lookup(["hd"]) is None
    assert len(v.rejected) == 3


def test_chunks_for_ranges():
    chunks = [chunk(0, 100, 0), chunk(100, 100, 50), chunk(200, 50, 90)]
    v = LayerView([E("f", size=250, chunks=chunks)])
    f = v.lookup(["f"])
    assert f.chunks_for(0, 10) == chunks[:1]
    assert f.chunks_for(99, 2) == chunks[:2]
    assert f.chunks_for(150, 1000) == chunks[1:]
    assert f.chunks_for(250, 10) == []


def test_inode_numbers_are_unique_across_layers():
    a = LayerView([E("f")], ino_base=1 << 32)
    b = LayerView([E("f")], ino_base=2 << 32)
    assert a.lookup(["f"]).ino != b.lookup(["f"]).ino


def test_binary_xattr_values_are_served_and_only_unencodable_names_decline():
    caps = b"\x01\x00\x00\x02\xff\x20\x00\x00"  # security.capability values are binary
    ok = LayerView([E("ping", xattrs={"security.capability": caps}), E("caf\u00e9"), E("raw\udcff")])
    assert ok.unservable == []
    assert ok.lookup(["ping"]).xattrs == {"security.capability": caps}
    bad = LayerView([E("lone\ud800")])  # no bytes stand for a lone high surrogate
    assert bad.unservable and "cannot be encoded" in bad.unservable[0]

def test_a_layer_knows_whether_any_file_has_xattrs():
    assert not LayerView([E("d", T.DIR), E("d/f")]).has_xattrs
    assert LayerView([E("d", T.DIR), E("d/f", xattrs={"user.a": b"1"})]).has_xattrs
    assert LayerView([E("d", T.DIR), E("d/.wh..wh..opq")]).has_xattrs  # overlay's opaque mark is one


def test_an_opaque_mark_is_its_directory_s_own_and_no_other_node_s():
    """Nodes without xattrs share one empty mapping: marking a directory opaque must not touch it."""
    v = LayerView([E("d", T.DIR), E("d/.wh..wh..opq"), E("e", T.DIR), E("f", size=0), E("g/h", size=0)])
    assert v.lookup(["d"]).xattrs == OPAQUE_XATTRS
    for path in (["e"], ["f"], ["g"], ["g", "h"], []):
        assert v.lookup(path).xattrs == {}, path
    assert not LayerView([E("x", T.DIR)]).has_xattrs  # a later layer's tree too


def test_a_consumed_entry_list_builds_the_same_tree_and_is_emptied():
    def entries():
        return [E("", T.DIR, mode=0o755), E("d", T.DIR), E("d/.wh..wh..opq"), E("d/a", size=250,
                chunks=[chunk(0, 100, 0), chunk(100, 100, 50), chunk(200, 50, 90)]),
                E("d/b", size=5, chunks=[chunk(0, 5, 200)], xattrs={"user.x": b"1"}),
                E("h", T.HARDLINK, linkname="d/a"), E("s", T.SYMLINK, linkname="d/b"), E(".wh.old")]
    kept, taken = entries(), entries()
    a, b = LayerView(kept), LayerView(taken, consume=True)
    assert all(e is not None for e in kept) and taken == [None] * len(kept)

    def walk(v):
        out, stack = {}, [("", v.root)]
        while stack:
            path, n = stack.pop()
            out[path] = (n.ino, n.mode, n.size, n.nlink, n.rdev, n.target, dict(n.xattrs), list(n.chunks),
                         list(n.chunk_offsets))
            stack.extend((f"{path}/{k}", c) for k, c in (n.children or {}).items())
        return out
    assert walk(a) == walk(b)
    assert b.lookup(["d", "a"]).chunks_for(150, 60) == a.lookup(["d", "a"]).chunks_for(150, 60)
