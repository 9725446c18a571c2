"""Property-based tests over the parsers a registry feeds: TOC → tree, tar headers, tar input.

test_estargz.py fuzzes the footer, the TOC JSON and chunk inflation one by
one. These go further down the path a hostile layer takes: whatever entry
list survives parsing, the layer view built from it must be a well-formed
tree (no name that could escape or confuse the kernel, exact link counts,
unique inodes, chunks that tile each file); the TOC member's own tar header
and the writer's tar input only ever raise FormatError. Each runs a bounded
number of examples with no per-example deadline, a few seconds in all.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from als.errors import FormatError
from als.formats import estargz, estargz_writer
from als.formats import toc as T
from als.layer.view import HIDDEN_AT_ROOT, LayerView
from tests.support.rawblob import sha, toc_tar

_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
D = sha(b"x")

# Names drawn from a small alphabet so that collisions, "..", whiteouts and
# paths through earlier entries happen often.
_parts = st.sampled_from(["a", "b", "c", "..", ".", "", ".wh.a", ".wh.b", ".wh..wh..opq", ".wh..", ".wh...",
                          "stargz.index.json", ".prefetch.landmark", "x" * 255])
names = st.lists(_parts, min_size=1, max_size=4).map("/".join) | st.sampled_from(["/", "./", "/a/../../b", "../../c"])
types = st.sampled_from(["dir", "reg", "reg", "symlink", "hardlink", "char", "block", "fifo"])


@st.composite
def toc_entries(draw) -> list[dict]:
    out = []
    offset = 10
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(types)
        e = {"name": draw(names), "type": kind, "mode": draw(st.sampled_from([0o755, 0o4755, 0o644, 0o1777])),
             "uid": draw(st.sampled_from([0, 1000, 2**32 - 2, 2**32 - 1, 2**63 - 1]))}
        if kind in ("symlink", "hardlink"):
            e["linkName"] = draw(names)
        if kind == "reg" and draw(st.booleans()):
            size = draw(st.integers(1, 300))
            e.update(size=size, offset=offset, chunkDigest=D)
            offset += 10
            if size > 100 and draw(st.booleans()):
                e["chunkSize"] = 100
                out.append(e)
                e = {"type": "chunk", "offset": offset, "chunkOffset": 100, "chunkDigest": D}
                offset += 10
        if kind in ("char", "block"):
            e.update(devMajor=draw(st.sampled_from([0, 1, 4095, 4096])),
                     devMinor=draw(st.sampled_from([0, 3, 2**20 - 1, 2**20])))
        out.append(e)
    return out


def _member(doc: dict) -> bytes:
    import gzip
    return gzip.compress(toc_tar(json.dumps(doc).encode()))


def check_tree(view: LayerView) -> None:
    """The invariants every layer view must hold, whatever the TOC said."""
    refs: dict[int, int] = {}  # id(node) -> names pointing at it
    nodes: dict[int, object] = {}
    seen_dirs: set[int] = set()
    stack = [(view.root, "")]
    while stack:
        d, path = stack.pop()
        assert id(d) not in seen_dirs, f"directory {path!r} is reachable twice"
        seen_dirs.add(id(d))
        subdirs = 0
        for name, child in d.children.items():
            raw = name.encode("utf-8", "surrogateescape")
            assert name not in ("", ".", "..") and "/" not in name and "\x00" not in name, (path, name)
            assert len(raw) <= 255, name
            assert child.is_dir or not (path == "" and name in HIDDEN_AT_ROOT), name
            # (a directory may carry the name: containers/storage creates such implicit parents too)
            assert child.is_dir or not name.startswith(".wh."), f"whiteout marker {path}/{name} left in tar form"
            nodes[id(child)] = child
            refs[id(child)] = refs.get(id(child), 0) + 1
            if child.is_dir:
                subdirs += 1
                stack.append((child, f"{path}/{name}"))
        assert d.nlink == 2 + subdirs, path
    inos = {}
    for key, node in nodes.items():
        assert inos.setdefault(node.ino, key) == key, f"inode {node.ino} is shared by two nodes"
        assert node.uid < 2**32 - 1 and node.gid < 2**32 - 1  # what uid_t (and the kernel) can hold
        assert os.makedev(os.major(node.rdev), os.minor(node.rdev)) == node.rdev
        assert os.major(node.rdev) < 4096 and os.minor(node.rdev) < 2**20  # FUSE's 32-bit rdev
        if node.is_dir:
            assert refs[key] == 1
            continue
        assert node.nlink == refs[key], f"inode {node.ino}: nlink {node.nlink}, {refs[key]} names"
        if stat.S_ISCHR(node.mode) and node.rdev == 0 and node.mode & 0o7777 == 0:
            continue  # an overlay whiteout
        if node.is_reg:
            pos = 0
            for c in node.chunks:
                assert c.offset == pos and c.size > 0
                pos += c.size
            assert pos == (node.size if node.chunks else 0)


@_FUZZ
@given(entries=toc_entries())
def test_any_parsed_toc_becomes_a_well_formed_tree(entries):
    try:
        parsed = estargz.parse_toc(_member({"version": 1, "entries": entries}), None, toc_offset=10_000)
    except FormatError:
        return
    check_tree(LayerView(parsed.entries, ino_base=1 << 32))


_entry_names = st.sampled_from(["a", "b", "a/b", "a/b/c", "b/a", "c", ".wh.a", "a/.wh.b", "a/.wh..wh..opq",
                                ".wh..", "a/.wh...", ".no.prefetch.landmark"])


@_FUZZ
@given(spec=st.lists(st.tuples(_entry_names, st.sampled_from([T.DIR, T.REG, T.SYMLINK, T.HARDLINK, T.FIFO]),
                               _entry_names), max_size=12))
def test_any_entry_list_becomes_a_well_formed_tree(spec):
    """Straight into the view, past the parser: replacement, links and whiteouts in any order."""
    entries = []
    for name, kind, link in spec:
        e = T.Entry(name=name, type=kind, mode=0o644)
        if kind == T.HARDLINK or kind == T.SYMLINK:
            e.linkname = link
        if kind == T.REG:
            e.size = 5
            e.chunks = [T.Chunk(offset=0, size=5, blob_start=0, blob_end=9, digest=D)]
        entries.append(e)
    check_tree(LayerView(entries))


def _header(**fields) -> bytes:
    info = tarfile.TarInfo(fields.pop("name", estargz.TOC_NAME))
    for k, v in fields.items():
        setattr(info, k, v)
    return info.tobuf(tarfile.USTAR_FORMAT)


@_FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), max_size=6),
       size=st.integers(0, 1 << 40), kind=st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE,
                                                          tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME]))
def test_toc_member_tar_header_mutations_raise_only_format_error(flips, size, kind):
    """The TOC member's tar header is parsed from hostile bytes: any mutation is a FormatError or a TOC."""
    import gzip
    payload = b'{"version":1,"entries":[]}'
    header = bytearray(_header(size=min(size, 8**11 - 1), type=kind))
    for at, value in flips:
        header[at] = value
    try:
        parsed = estargz.parse_toc(gzip.compress(bytes(header) + payload + bytes(1024)), None, toc_offset=0,
                                   max_toc_size=1 << 20)
    except FormatError:
        return
    assert parsed.entries == []


def _tar(members: list[tuple[str, bytes, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                info.linkname = "a" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
                tf.addfile(info)
    return buf.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members=st.lists(st.tuples(st.sampled_from(["a", "b/c", "./d", "../e", "/f", "g/../h"]),
                                  st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                                                   tarfile.LNKTYPE, tarfile.FIFOTYPE]),
                                  st.binary(max_size=300)), max_size=5),
       cut=st.integers(0, 4000), flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=4))
def test_writer_tar_input_mutations_raise_only_format_error(members, cut, flips):
    """`als convert` feeds registry tars to the writer: broken input is a FormatError, never a crash,
    and what it does write reads back as a valid TOC."""
    data = bytearray(_tar(members))
    for at, value in flips:
        if at < len(data):
            data[at] = value
    data = bytes(data[:cut]) if cut < len(data) else bytes(data)
    out = io.BytesIO()
    try:
        result = estargz_writer.write_estargz(io.BytesIO(data), out, chunk_size=128, level=1)
    except FormatError:
        return
    blob = out.getvalue()
    offset, footer = estargz.parse_footer(blob[-51:], len(blob))
    parsed = estargz.parse_toc(blob[offset:len(blob) - footer], result.toc_digest, toc_offset=offset)
    check_tree(LayerView(parsed.entries))


@pytest.mark.parametrize("entries, bad", [
    # a hard link to an entry a later directory entry replaced is not a link to anything left in the layer
    ([{"name": "d/f", "type": "reg", "offset": 10, "size": 1, "chunkDigest": D}, {"name": "d", "type": "reg"},
      {"name": "h", "type": "hardlink", "linkName": "d/f"}], "h"),
    # whiteouts of "." and ".." would put a second "." or ".." in a directory listing
    ([{"name": ".wh..", "type": "reg"}, {"name": "a/.wh...", "type": "reg"}], None),
])
def test_found_by_the_properties_above(entries, bad):
    """Cases the properties found (kept as examples so they never come back)."""
    view = LayerView(estargz.parse_toc(_member({"version": 1, "entries": entries}), None,
                                       toc_offset=1000).entries)
    check_tree(view)
    if bad:
        assert view.lookup(bad.split("/")) is None


def test_the_entry_and_node_limits_hold():
    """A small TOC may still ask for a huge tree (deep unique paths): both counts are capped."""
    doc = {"version": 1, "entries": [{"name": f"d{i}", "type": "dir"} for i in range(3)]}
    with pytest.raises(FormatError, match="3 entries, over the limit of 2"):
        estargz.parse_toc(_member(doc), None, toc_offset=0, max_entries=2)
    deep = [T.Entry(name=f"t{i}/" + "/".join(["a"] * 50), type=T.DIR) for i in range(3)]
    assert LayerView(deep, max_nodes=200).max_ino == 1 + 3 * 51
    with pytest.raises(FormatError, match="more than 100 nodes"):
        LayerView(deep, max_nodes=100)
