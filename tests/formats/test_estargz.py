"""eStargz reader and writer: round trips, hostile input, and interop with sgz."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import random
import tarfile
import time
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from als.digest import sha256_digest
from als.errors import FormatError, VerificationError
from als.formats import estargz, estargz_writer, reorder, toc
from tests.support import containerd as ctd

CHUNK = 64 << 10
MTIME = 1_700_000_000  # 2023-11-14T22:13:20Z


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------
# Input tar
# --------------------------------------------------------------------------

BIG = random.Random(1).randbytes(3 * CHUNK + 1234)  # four chunks, the last one short
LONG_NAME = "long/" + "n" * 60 + "/" + "x" * 120  # > 100 chars: needs a PAX path record
CAPABILITY = b"\x01\x00\x00\x02\x00\x04\x00\x00\xff\xfe\x00\x00"  # not UTF-8


def _member(name: str, type_=tarfile.REGTYPE, **attrs) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.mtime = MTIME
    info.mode = 0o755 if type_ == tarfile.DIRTYPE else 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def _input_members() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """Every kind of entry a layer can hold, with content for regular files."""
    return [
        (_member("d", tarfile.DIRTYPE), None),
        (
            _member(
                "d/big",
                uid=1000,
                gid=1001,
                uname="alice",
                gname="staff",
                mtime=MTIME + 7,
                pax_headers={
                    "SCHILY.xattr.user.foo": "bar",
                    # tarfile hands undecodable bytes around as surrogates.
                    "SCHILY.xattr.security.capability": CAPABILITY.decode("utf-8", "surrogateescape"),
                },
            ),
            BIG,
        ),
        (_member("d/empty"), b""),
        (_member("d/link", tarfile.SYMTYPE, linkname="big", mode=0o777), None),
        (_member("d/hard", tarfile.LNKTYPE, linkname="d/big"), None),
        (_member("dev", tarfile.DIRTYPE), None),
        (_member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), None),
        (_member("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660, gid=6), None),
        (_member("dev/fifo", tarfile.FIFOTYPE), None),
        (_member("bin", tarfile.DIRTYPE), None),
        (_member("bin/su", mode=0o4755), b"#!/bin/sh\necho su\n"),
        (_member("srv", tarfile.DIRTYPE, mode=0o2775), None),
        (_member("tmp", tarfile.DIRTYPE, mode=0o1777, mtime=0), None),
        (_member("long", tarfile.DIRTYPE), None),
        (_member("long/" + "n" * 60, tarfile.DIRTYPE), None),
        (_member(LONG_NAME), b"long name\n"),
        (_member("d/.wh.gone"), b""),
        (_member("d/.wh..wh..opq"), b""),
        (_member("d/small"), b"hello world\n"),
    ]


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _convert(tar_bytes: bytes, **kwargs) -> tuple[bytes, estargz_writer.WriteResult]:
    out = io.BytesIO()
    result = estargz_writer.write_estargz(io.BytesIO(tar_bytes), _NoSeek(out), **kwargs)
    return out.getvalue(), result


class _NoSeek(io.RawIOBase):
    """A write-only sink that cannot tell or seek, like a pipe."""

    def __init__(self, target: io.BytesIO):
        self._target = target

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        # Accept at most 1000 bytes per call to exercise short writes.
        data = bytes(data[:1000])
        self._target.write(data)
        return len(data)


def _read_toc(blob: bytes, expected: str | None = None) -> toc.TOC:
    toc_offset, footer_size = estargz.parse_footer(blob[-estargz.FOOTER_SIZE :], len(blob))
    assert footer_size == estargz.FOOTER_SIZE
    return estargz.parse_toc(blob[toc_offset : len(blob) - footer_size], expected, toc_offset=toc_offset)


def _file_content(blob: bytes, entry: toc.Entry) -> bytes:
    """Reassemble a file from its chunks, verifying each one."""
    out = b""
    for chunk in entry.chunks:
        data = estargz.decompress_chunk(blob[chunk.blob_start : chunk.blob_end], chunk)
        assert len(data) == chunk.size
        assert sha256_digest(data) == chunk.digest
        out += data
    return out


# --------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted():
    members = _input_members()
    tar_bytes = _tar(members)
    blob, result = _convert(tar_bytes, chunk_size=CHUNK)
    return members, blob, result


def test_blob_is_plain_gzip_of_a_tar_with_the_same_entries(converted):
    members, blob, result = converted
    raw = gzip.decompress(blob)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        got = {m.name: (m, tf.extractfile(m).read() if m.isreg() else None) for m in tf}
        names = tf.getnames()
    want_names = [estargz.NO_PREFETCH_LANDMARK] + [i.name for i, _ in members] + [estargz.TOC_NAME]
    assert names == want_names
    assert got[estargz.NO_PREFETCH_LANDMARK][1] == b"\x0f"
    assert got[estargz.NO_PREFETCH_LANDMARK][0].mode == 0o644
    for info, data in members:
        m, content = got[info.name]
        assert (m.type, m.mode, m.uid, m.gid, m.uname, m.gname, m.mtime, m.linkname) == (
            info.type,
            info.mode,
            info.uid,
            info.gid,
            info.uname,
            info.gname,
            info.mtime,
            info.linkname,
        ), info.name
        assert (m.devmajor, m.devminor) == (info.devmajor, info.devminor)
        if info.isreg():
            assert content == data
        xattrs = {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        assert xattrs == {k: v for k, v in info.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    toc_json = got[estargz.TOC_NAME][1]
    assert sha(toc_json) == result.toc_digest
    assert json.loads(toc_json)["version"] == 1
    assert toc_json.startswith(b'{\n\t"version": 1,')  # tab-indented like sgz
    # The uncompressed stream ends with the TOC entry and exactly the tar EOF.
    assert raw.endswith(toc_json + bytes(-len(toc_json) % 512) + bytes(1024))


def test_write_result_describes_the_blob(converted):
    _, blob, result = converted
    raw = gzip.decompress(blob)
    assert result.diff_id == sha(raw)
    assert result.uncompressed_size == len(raw)
    assert result.blob_digest == sha(blob)
    assert result.compressed_size == len(blob)
    assert blob[-51:] == estargz.make_footer(estargz.parse_footer(blob[-51:], len(blob))[0])


def test_toc_entries_match_input(converted):
    members, blob, result = converted
    t = _read_toc(blob, result.toc_digest)
    assert t.digest == result.toc_digest
    assert t.compression == toc.GZIP
    assert t.data_end == estargz.parse_footer(blob[-51:], len(blob))[0]
    names = [e.name for e in t.entries]
    assert names == [estargz.NO_PREFETCH_LANDMARK] + [i.name for i, _ in members]
    by_name = {e.name: e for e in t.entries}
    kinds = {
        tarfile.REGTYPE: toc.REG,
        tarfile.DIRTYPE: toc.DIR,
        tarfile.SYMTYPE: toc.SYMLINK,
        tarfile.LNKTYPE: toc.HARDLINK,
        tarfile.CHRTYPE: toc.CHAR,
        tarfile.BLKTYPE: toc.BLOCK,
        tarfile.FIFOTYPE: toc.FIFO,
    }
    for info, data in members:
        e = by_name[info.name]
        assert e.type == kinds[info.type], info.name
        assert (e.mode, e.uid, e.gid, e.mtime) == (info.mode, info.uid, info.gid, info.mtime), info.name
        assert (e.devmajor, e.devminor) == (info.devmajor, info.devminor)
        assert e.linkname == info.linkname
        if info.isreg():
            assert e.size == len(data)
            assert e.digest == sha(data)
            assert _file_content(blob, e) == data
            assert (e.chunks == []) == (data == b"")
        else:
            assert e.size == 0 and e.chunks == [] and e.digest == ""
    big = by_name["d/big"]
    assert big.xattrs == {"user.foo": b"bar", "security.capability": CAPABILITY}
    assert [(c.offset, c.size) for c in big.chunks] == [
        (0, CHUNK),
        (CHUNK, CHUNK),
        (2 * CHUNK, CHUNK),
        (3 * CHUNK, 1234),
    ]
    assert by_name["bin/su"].mode == 0o4755
    assert by_name["srv"].mode == 0o2775
    assert by_name["tmp"].mode == 0o1777 and by_name["tmp"].mtime == 0
    assert by_name["d/big"].mtime == MTIME + 7
    assert (by_name["d/big"].uid, by_name["d/big"].gid) == (1000, 1001)
    assert by_name["d/hard"].linkname == "d/big"
    assert by_name["d/link"].linkname == "big"
    landmark = by_name[estargz.NO_PREFETCH_LANDMARK]
    assert _file_content(blob, landmark) == b"\x0f"


def test_every_chunk_starts_a_gzip_member_and_ranges_tile_the_data(converted):
    _, blob, result = converted
    t = _read_toc(blob, result.toc_digest)
    chunks = sorted((c for e in t.entries for c in e.chunks), key=lambda c: c.blob_start)
    for chunk in chunks:
        assert blob[chunk.blob_start : chunk.blob_start + 3] == b"\x1f\x8b\x08"
        assert chunk.inner_offset == 0
    # Consecutive chunks share boundaries: each range ends where the next begins.
    for a, b in zip(chunks, chunks[1:]):
        assert a.blob_end == b.blob_start
    assert chunks[-1].blob_end == t.data_end


def test_raw_toc_json_is_sgz_shaped(converted):
    _, blob, _ = converted
    raw = gzip.decompress(blob)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        doc = json.loads(tf.extractfile(estargz.TOC_NAME).read())
    entries = {(e["name"], e["type"], e.get("chunkOffset", 0)): e for e in doc["entries"]}
    big = entries[("d/big", "reg", 0)]
    assert big["size"] == len(BIG)
    assert big["modtime"] == "2023-11-14T22:13:27Z"
    assert big["userName"] == "alice" and big["groupName"] == "staff"
    assert big["chunkSize"] == CHUNK
    assert big["xattrs"]["user.foo"] == base64.b64encode(b"bar").decode()
    last = entries[("d/big", "chunk", 3 * CHUNK)]
    assert "chunkSize" not in last  # 0 = to the end of the file
    assert entries[("d/", "dir", 0)]["mode"] == 0o755
    assert entries[("tmp/", "dir", 0)].get("modtime") is None
    assert entries[("dev/null", "char", 0)]["devMajor"] == 1
    empty = entries[("d/empty", "reg", 0)]
    assert "offset" not in empty and "size" not in empty


def test_gzip_input_and_previous_toc_and_landmarks_are_dropped():
    members = [
        (_member(estargz.NO_PREFETCH_LANDMARK), b"\x0f"),
        (_member("a"), b"A" * 10),
        (_member("./" + estargz.TOC_NAME), b"{}"),
    ]
    blob, result = _convert(gzip.compress(_tar(members)), chunk_size=CHUNK)
    t = _read_toc(blob, result.toc_digest)
    assert [e.name for e in t.entries] == [estargz.NO_PREFETCH_LANDMARK, "a"]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tf:
        assert tf.getnames() == [estargz.NO_PREFETCH_LANDMARK, "a", estargz.TOC_NAME]


def test_empty_input_gives_landmark_only():
    blob, result = _convert(_tar([]))
    t = _read_toc(blob, result.toc_digest)
    assert [e.name for e in t.entries] == [estargz.NO_PREFETCH_LANDMARK]


def test_garbage_input_is_a_format_error():
    with pytest.raises(FormatError):
        _convert(b"this is not a tar" * 100)


def test_default_chunk_size_keeps_small_files_in_one_chunk():
    blob, result = _convert(_tar(_input_members()))
    t = _read_toc(blob, result.toc_digest)
    big = next(e for e in t.entries if e.name == "d/big")
    assert len(big.chunks) == 1 and big.chunks[0].size == len(BIG)
    assert _file_content(blob, big) == BIG


# --------------------------------------------------------------------------
# Prioritized files
# --------------------------------------------------------------------------


def _prio_members():
    return [
        (_member("a", tarfile.DIRTYPE), None),
        (_member("a/b", tarfile.DIRTYPE), None),
        (_member("a/b/f1"), b"f1" * 100),
        (_member("c", tarfile.DIRTYPE), None),
        (_member("c/f2"), b"f2"),
        (_member("c/f3"), b"f3" * 40000),
        (_member("c/h", tarfile.LNKTYPE, linkname="a/b/f1"), None),
        (_member("z"), b"z"),
    ]


def test_prioritized_files_come_first_then_the_landmark():
    tar_bytes = _tar(_prio_members())
    blob, result = _convert(tar_bytes, chunk_size=CHUNK, prioritized=["./c/f3", "a/b/f1", "missing/file"])
    t = _read_toc(blob, result.toc_digest)
    want = ["c", "c/f3", "a", "a/b", "a/b/f1", estargz.PREFETCH_LANDMARK, "c/f2", "c/h", "z"]
    assert [e.name for e in t.entries] == want
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tf:
        assert [n.rstrip("/") for n in tf.getnames()] == want + [estargz.TOC_NAME]
        assert tf.extractfile("c/f3").read() == b"f3" * 40000
    by_name = {e.name: e for e in t.entries}
    landmark = by_name[estargz.PREFETCH_LANDMARK]
    # Everything prioritized lies before the landmark, so one range prefetches it.
    assert by_name["c/f3"].chunks[-1].blob_end <= landmark.chunks[0].blob_start
    assert by_name["a/b/f1"].chunks[-1].blob_end <= landmark.chunks[0].blob_start
    assert by_name["c/f2"].chunks[0].blob_start > landmark.chunks[0].blob_start
    for name, data in (("c/f3", b"f3" * 40000), ("a/b/f1", b"f1" * 100), ("z", b"z")):
        assert _file_content(blob, by_name[name]) == data
    assert _file_content(blob, landmark) == b"\x0f"


def test_prioritized_hard_link_brings_its_target_along():
    names = [i.name for i, _ in _prio_members()]
    links = [i.linkname if i.islnk() else "" for i, _ in _prio_members()]
    order, n = reorder.prefetch_order(names, links, ["c/h"])
    assert [names[i] for i in order[:n]] == ["c", "a", "a/b", "a/b/f1", "c/h"]
    assert sorted(order) == list(range(len(names)))


def test_prioritized_but_nothing_matches_is_no_prefetch():
    blob, result = _convert(_tar(_prio_members()), prioritized=["nope"])
    t = _read_toc(blob, result.toc_digest)
    assert t.entries[0].name == estargz.NO_PREFETCH_LANDMARK
    assert [e.name for e in t.entries[1:]] == [i.name for i, _ in _prio_members()]


def _front_heard(blob: bytes) -> list[int]:
    heard: list[int] = []
    toc_offset, footer_size = estargz.parse_footer(blob[-estargz.FOOTER_SIZE:], len(blob))
    estargz.parse_toc(blob[toc_offset:len(blob) - footer_size], None, toc_offset=toc_offset,
                      on_front=heard.append)
    return heard


def test_the_parse_tells_where_the_prioritised_front_ends_before_it_builds_the_entries():
    blob, result = _convert(_tar(_prio_members()), chunk_size=CHUNK, prioritized=["c/f3"])
    landmark = next(e for e in _read_toc(blob).entries if e.name == estargz.PREFETCH_LANDMARK)
    assert _front_heard(blob) == [landmark.chunks[0].blob_start]
    assert _front_heard(_convert(_tar(_prio_members()), prioritized=["nope"])[0]) == []  # no.prefetch
    assert _front_heard(_convert(_tar(_prio_members()))[0]) == []  # no landmark at all


@pytest.mark.parametrize("offset", ["12", -5, 1 << 40, 0, None])
def test_a_landmark_offset_that_cannot_be_a_front_is_not_heard(offset):
    items = [{"name": "a", "type": "reg", "offset": 0}, {"name": "./" + estargz.PREFETCH_LANDMARK, "offset": offset}]
    assert estargz.front_end(items, toc_offset=1 << 20) == 0
    items[1]["offset"] = 4096
    assert estargz.front_end(items, toc_offset=1 << 20) == 4096


def test_all_prioritized_puts_landmark_last():
    blob, result = _convert(_tar([(_member("only"), b"x")]), prioritized=["only"])
    t = _read_toc(blob, result.toc_digest)
    assert [e.name for e in t.entries] == ["only", estargz.PREFETCH_LANDMARK]


# --------------------------------------------------------------------------
# Footer
# --------------------------------------------------------------------------


def test_footer_bytes_match_the_spec_example():
    want = bytes.fromhex(
        "1f8b08040000000000ff1a00534716003030303030303030303031323334616253544152475a"
        "010000ffff0000000000000000"
    )
    assert estargz.make_footer(0x1234AB) == want
    assert gzip.decompress(want) == b""
    assert estargz.parse_footer(b"junk" + want, 0x200000) == (0x1234AB, 51)


def test_legacy_footer(converted):
    _, blob, result = converted
    toc_offset, _ = estargz.parse_footer(blob[-51:], len(blob))
    legacy = blob[:-51] + estargz.make_legacy_footer(toc_offset)
    assert len(estargz.make_legacy_footer(0)) == 47
    assert gzip.decompress(legacy) == gzip.decompress(blob)
    got_offset, size = estargz.parse_footer(legacy[-51:], len(legacy))
    assert (got_offset, size) == (toc_offset, 47)
    t = estargz.parse_toc(legacy[toc_offset:-47], result.toc_digest, toc_offset=toc_offset)
    assert t.digest == result.toc_digest


def test_short_blob_with_legacy_footer():
    footer = estargz.make_legacy_footer(0)
    blob = b"\x00" * 3 + footer  # 50 bytes: shorter than an eStargz footer
    assert estargz.parse_footer(blob, len(blob)) == (0, 47)


# A complete, empty 51-byte gzip member (FNAME instead of FEXTRA): gzip, not stargz.
_NAMED_EMPTY_GZIP = b"\x1f\x8b\x08\x08\x00\x00\x00\x00\x00\xff" + b"n" * 30 + b"\x00\x03\x00" + bytes(8)


@pytest.mark.parametrize(
    ("tail", "blob_size", "message"),
    [
        (b"x" * 51, 1000, "not end with a gzip"),
        (_NAMED_EMPTY_GZIP, 1000, "not a stargz footer"),
        (estargz.make_footer(5).replace(b"STARGZ", b"STARGX"), 1000, "not a stargz footer"),
        (estargz.make_footer(5).replace(b"00000005", b"0000000g"), 1000, "not a stargz footer"),
        (estargz.make_footer(5)[:-1] + b"\x01", 1000, "not a stargz footer"),  # bad ISIZE
        (estargz.make_footer(949), 1000, "outside"),
        (estargz.make_footer(10**9), 1000, "outside"),
        (estargz.make_footer(5)[-30:], 1000, "need the last 51"),
        (estargz.make_footer(5), 40, "too small"),
        (estargz.make_footer(5), 50, "got 51 tail bytes"),
    ],
)
def test_bad_footers(tail, blob_size, message):
    with pytest.raises(FormatError, match=message):
        estargz.parse_footer(tail, blob_size)


def test_named_empty_gzip_is_a_gzip_member():
    assert len(_NAMED_EMPTY_GZIP) == 51 and gzip.decompress(_NAMED_EMPTY_GZIP) == b""


def test_footer_offset_just_in_range():
    assert estargz.parse_footer(estargz.make_footer(948), 1000) == (948, 51)
    assert estargz.parse_footer(estargz.make_footer(0), 1000) == (0, 51)


# --------------------------------------------------------------------------
# Hostile TOCs
# --------------------------------------------------------------------------

D1 = sha(b"1")


def _toc_member(payload: bytes | dict, *, name: str = estargz.TOC_NAME, size: int | None = None) -> bytes:
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()
    info = tarfile.TarInfo(name)
    info.size = len(payload) if size is None else size
    return gzip.compress(info.tobuf(tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % 512) + bytes(1024))


def _parse(doc: dict | bytes, toc_offset: int = 10_000, **kwargs) -> toc.TOC:
    return estargz.parse_toc(_toc_member(doc), None, toc_offset=toc_offset, **kwargs)


def _reg(name="f", size=1, **fields) -> dict:
    entry = {"name": name, "type": "reg", "size": size, "offset": 100, "chunkDigest": D1}
    entry.update(fields)
    return entry


def test_minimal_toc_and_normalisation():
    t = _parse(
        {
            "version": 1,
            "entries": [
                {"name": "./", "type": "dir", "mode": 0o40755},
                {"name": "./a/../b/", "type": "dir", "modtime": "2023-11-14T23:13:20+01:00"},
                {"name": "/b//f", "type": "reg", "size": 5, "offset": 100, "chunkDigest": D1, "mode": 0o104755},
                {"name": "../../h", "type": "hardlink", "linkName": "./b/f"},
                {"name": "e", "type": "reg"},
                {"name": "s", "type": "symlink", "linkName": "../x", "modtime": "1970-01-01T00:00:01.9Z"},
            ],
        },
        toc_offset=300,
    )
    assert [e.name for e in t.entries] == ["", "b", "b/f", "h", "e", "s"]
    root, b, f, h, e, s = t.entries
    assert root.mode == 0o755 and f.mode == 0o4755
    assert b.mtime == MTIME
    assert f.chunks == [toc.Chunk(offset=0, size=5, blob_start=100, blob_end=300, digest=D1)]
    assert h.linkname == "b/f" and s.linkname == "../x" and s.mtime == 1
    assert e.chunks == [] and e.size == 0
    assert t.data_end == 300 and t.digest.startswith("sha256:")


def test_blob_end_skips_repeated_offsets_of_min_chunk_size_mode():
    d2 = sha(b"2")
    t = _parse(
        {
            "version": 1,
            "entries": [
                _reg("a", 3, offset=50),
                _reg("b", 4, offset=50, innerOffset=1024, chunkDigest=d2),
                {"name": "dir", "type": "dir"},
                _reg("c", 5, offset=80),
            ],
        },
        toc_offset=120,
    )
    a, b, _, c = t.entries
    assert (a.chunks[0].blob_start, a.chunks[0].blob_end) == (50, 80)
    assert (b.chunks[0].blob_end, b.chunks[0].inner_offset) == (80, 1024)
    assert c.chunks[0].blob_end == 120


def test_chunk_entries_fold_into_their_file():
    d2, d3 = sha(b"2"), sha(b"3")
    t = _parse(
        {
            "version": 1,
            "entries": [
                _reg("f", 25, offset=10, chunkSize=10),
                {"type": "chunk", "offset": 20, "chunkOffset": 10, "chunkSize": 10, "chunkDigest": d2},
                {"name": "./f", "type": "chunk", "offset": 30, "chunkOffset": 20, "chunkDigest": d3},
                _reg("g", 1, offset=40),
            ],
        },
        toc_offset=60,
    )
    f, g = t.entries
    assert [(c.offset, c.size, c.blob_start, c.blob_end, c.digest) for c in f.chunks] == [
        (0, 10, 10, 20, D1),
        (10, 10, 20, 30, d2),
        (20, 5, 30, 40, d3),
    ]
    assert g.chunks[0].blob_end == 60


def test_digest_fallback_when_layer_has_no_chunk_digests():
    entries = [
        {"name": "f", "type": "reg", "size": 1, "offset": 10, "digest": D1},
        {"name": "e", "type": "reg", "digest": sha(b"")},
    ]
    t = _parse({"version": 1, "entries": entries}, toc_offset=20)
    assert t.entries[0].chunks[0].digest == D1
    # ...but not once any entry has a chunkDigest.
    entries.append(_reg("g", offset=15))
    with pytest.raises(FormatError, match="no chunkDigest"):
        _parse({"version": 1, "entries": entries}, toc_offset=20)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"name": "x", "type": "socket"}], "unknown entry type"),
        ([{"name": "x", "type": 3}], "must be a str"),
        ([_reg("f", 20, chunkSize=10), {"type": "chunk", "offset": 200, "chunkOffset": 5, "chunkDigest": D1}], "overlap"),
        ([_reg("f", 20, chunkSize=10), {"type": "chunk", "offset": 200, "chunkOffset": 15, "chunkDigest": D1}], "gap"),
        ([_reg("f", 20, chunkSize=10)], "cover 10 bytes of 20"),
        ([_reg("f", 5, chunkSize=10)], "cover 10 bytes of 5"),
        ([_reg("f", 5, chunkOffset=6)], "beyond the file size"),
        ([_reg("a\x00b")], "NUL"),
        ([_reg("d/" + "x" * 256)], "longer than 255"),
        ([_reg("\ud800")], "not valid UTF-8"),
        ([_reg(offset=-1)], "out of range"),
        ([_reg(size=-5)], "out of range"),
        ([_reg(uid=1 << 64)], "out of range"),
        ([_reg(offset=True)], "must be a int"),
        ([_reg(chunkDigest="sha256:abc")], "not a sha256"),
        ([_reg(chunkDigest=None)], "must be a str"),
        ([_reg(chunkDigest="")], "no chunkDigest"),
        ([_reg(offset=10_000)], "outside the data"),
        ([_reg(offset=200), _reg("g", offset=100)], "outside the data"),
        ([{"type": "chunk", "offset": 200, "chunkDigest": D1}], "does not follow a regular file"),
        ([_reg("f", 2, chunkSize=1), {"name": "g", "type": "chunk", "offset": 200, "chunkOffset": 1, "chunkDigest": D1}], "follows regular file"),
        ([_reg("f", 2, chunkSize=1), {"name": "d", "type": "dir"}, {"type": "chunk", "offset": 200, "chunkOffset": 1, "chunkDigest": D1}], "does not follow"),
        ([{"name": "e", "type": "reg"}, {"type": "chunk", "offset": 200, "chunkDigest": D1}], "empty but has chunk"),
        ([{"name": "l", "type": "hardlink"}], "without linkName"),
        ([{"name": "l", "type": "symlink", "linkName": "a\x00"}], "NUL"),
        ([{"name": "./", "type": "reg"}], "root entry must be a directory"),
        ([{"name": "d", "type": "dir", "modtime": "yesterday"}], "not RFC 3339"),
        ([{"name": "d", "type": "dir", "modtime": "2023-02-30T00:00:00Z"}], "day is out of range"),
        ([{"name": "d", "type": "dir", "xattrs": {"user.a": "!!"}}], "not valid base64"),
        ([{"name": "d", "type": "dir", "xattrs": {"user.a": 1}}], "not a base64 string"),
        ([{"name": "d", "type": "dir", "xattrs": []}], "must be a dict"),
        (["nope"], "not a JSON object"),
        # limits that bound what a hostile TOC costs or would make the kernel fail (test_hostile.py: end to end)
        ([_reg("/".join(["d" * 200] * 21))], "longer than 4095 bytes"),
        ([{"name": "l", "type": "symlink", "linkName": "x" * 4096}], "symlink target is longer than 4095"),
        ([{"name": "d", "type": "dir", "xattrs": {"user.a": base64.b64encode(bytes(65537)).decode()}}],
         "longer than 65536 bytes"),
        ([{"name": "d", "type": "dir", "uid": 2**32 - 1}], "out of range"),
        ([{"name": "d", "type": "dir", "gid": 2**40}], "out of range"),
        ([{"name": "c", "type": "char", "devMajor": 4096}], "device 4096:0 is out of range"),
        ([{"name": "c", "type": "block", "devMinor": 2**20}], "out of range"),
        ([_reg("f", 40 << 20, offset=100)], "over the limits"),
        ([_reg("f", 10, innerOffset=40 << 20)], "over the limits"),
    ],
)
def test_bad_toc_entries(entries, message):
    with pytest.raises(FormatError, match=message):
        _parse({"version": 1, "entries": entries}, toc_offset=1000)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"version": 2, "entries": []}, "version 2"),
        ({"version": True, "entries": []}, "version True"),
        ({"entries": []}, "version None"),
        ({"version": 1, "entries": {}}, "not a list"),
        ([], "not an object"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ],
)
def test_bad_toc_documents(doc, message):
    payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    with pytest.raises(FormatError, match=message):
        estargz.parse_toc(_toc_member(payload), None, toc_offset=10)


def test_toc_digest_mismatch_is_a_verification_error(converted):
    _, blob, result = converted
    other = "sha256:" + "0" * 64
    with pytest.raises(VerificationError, match="manifest says"):
        _read_toc(blob, other)
    assert _read_toc(blob, None).digest == result.toc_digest


def test_toc_member_framing_errors():
    good = {"version": 1, "entries": []}
    with pytest.raises(FormatError, match="not a regular file 'stargz.index.json'"):
        estargz.parse_toc(_toc_member(good, name="other.json"), None, toc_offset=0)
    header = _toc_member(b"{}", size=600)
    info = tarfile.TarInfo(estargz.TOC_NAME)
    info.size = 600
    with pytest.raises(FormatError, match="truncated: 2 of 600"):
        estargz.parse_toc(gzip.compress(info.tobuf(tarfile.USTAR_FORMAT) + b"{}"), None, toc_offset=0)
    with pytest.raises(FormatError, match="not valid JSON"):  # zero padding is read as JSON
        estargz.parse_toc(header, None, toc_offset=0)
    member = _toc_member(good)
    with pytest.raises(FormatError):
        estargz.parse_toc(member[: len(member) // 2], None, toc_offset=0)
    with pytest.raises(FormatError, match="before its tar header"):
        estargz.parse_toc(b"", None, toc_offset=0)
    with pytest.raises(FormatError, match="corrupt gzip"):
        estargz.parse_toc(b"\x1f\x8b\x08\x00" + b"\xff" * 100, None, toc_offset=0)
    # Only the first member counts: a second one after it is ignored.
    assert estargz.parse_toc(member + gzip.compress(b"junk"), None, toc_offset=0).entries == []


def _zeros_member(prefix: bytes, total: int) -> bytes:
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts = [z.compress(prefix)]
    piece = bytes(1 << 20)
    for _ in range(total // len(piece)):
        parts.append(z.compress(piece))
    parts.append(z.flush())
    return b"".join(parts)


@pytest.mark.parametrize("claimed", [200 << 20, 1000])
def test_gzip_bomb_toc_is_rejected_quickly_and_in_little_memory(claimed):
    info = tarfile.TarInfo(estargz.TOC_NAME)
    info.size = claimed
    bomb = _zeros_member(info.tobuf(tarfile.USTAR_FORMAT), 200 << 20)
    assert len(bomb) < 2 << 20
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(FormatError):
            estargz.parse_toc(bomb, None, toc_offset=0, max_toc_size=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 2
    assert peak < 4 << 20


def test_gzip_bomb_of_zeros_without_header():
    bomb = _zeros_member(b"", 200 << 20)
    with pytest.raises(FormatError, match="tar header"):
        estargz.parse_toc(bomb, None, toc_offset=0)


# --------------------------------------------------------------------------
# Chunks
# --------------------------------------------------------------------------


def _chunk(size: int, inner: int = 0) -> toc.Chunk:
    return toc.Chunk(offset=0, size=size, blob_start=0, blob_end=1, digest=D1, inner_offset=inner)


@pytest.fixture(params=["isal", "zlib"])
def inflater(request, monkeypatch):
    """Chunks inflate alike through ISA-L (the dependency) and through zlib (the fallback)."""
    if request.param == "zlib":
        monkeypatch.setattr(estargz, "inflater", zlib)
        monkeypatch.setattr(estargz, "INFLATE_ERRORS", (zlib.error,))
    return request.param


def test_chunks_inflate_through_isal_when_installed():
    pytest.importorskip("isal")
    assert estargz.inflater.__name__ == "isal.isal_zlib"


def test_decompress_chunk_through_each_inflater_gives_the_same_bytes(inflater):
    data = bytes(random.Random(7).randrange(40) for _ in range(300_000))
    blob = b"".join(gzip.compress(data[i:i + 70_000], compresslevel=6) for i in range(0, len(data), 70_000))
    assert estargz.decompress_chunk(blob, _chunk(len(data))) == data
    assert estargz.decompress_chunk(blob, _chunk(1000, inner=123_456)) == data[123_456:124_456]


def test_decompress_chunk_across_members_and_inner_offset(inflater):
    data = gzip.compress(b"0123") + gzip.compress(b"") + gzip.compress(b"4567") + b"trailing junk"
    assert estargz.decompress_chunk(data, _chunk(6, inner=1)) == b"123456"
    assert estargz.decompress_chunk(data, _chunk(8)) == b"01234567"


def test_decompress_chunk_errors(inflater):
    with pytest.raises(FormatError, match="inflates to 4 bytes, need 5"):
        estargz.decompress_chunk(gzip.compress(b"0123"), _chunk(5))
    # zlib finds the bad header; ISA-L waits for more header bytes that never come
    with pytest.raises(FormatError, match="corrupt gzip" if inflater == "zlib" else "inflates to 4 bytes"):
        estargz.decompress_chunk(gzip.compress(b"0123") + b"garbage", _chunk(5))
    with pytest.raises(FormatError, match="corrupt gzip"):
        estargz.decompress_chunk(gzip.compress(b"0123")[:10] + b"\xff" * 64, _chunk(5))
    with pytest.raises(FormatError, match="inflates to"):
        estargz.decompress_chunk(gzip.compress(b"0123")[:12], _chunk(4))
    # Missing only the gzip trailer: the bytes are all there; the digest is the check.
    assert estargz.decompress_chunk(gzip.compress(b"0123")[:-8], _chunk(4)) == b"0123"
    with pytest.raises(FormatError):
        estargz.decompress_chunk(b"", _chunk(1))


def test_decompress_chunk_is_bounded(inflater):
    bomb = _zeros_member(b"", 100 << 20)
    tracemalloc.start()
    try:
        assert estargz.decompress_chunk(bomb, _chunk(1000, inner=10)) == bytes(1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# --------------------------------------------------------------------------
# Property tests: hostile bytes only ever raise FormatError
# --------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
toc_keys = st.sampled_from(
    [
        "name", "type", "size", "modtime", "linkName", "mode", "uid", "gid", "devMajor", "devMinor",
        "xattrs", "digest", "offset", "innerOffset", "chunkOffset", "chunkSize", "chunkDigest",
    ]
)
toc_values = st.one_of(
    json_values,
    st.sampled_from(["reg", "dir", "chunk", "symlink", "hardlink", "char", "block", "fifo", D1, "a/b", "", "."]),
    st.integers(0, 300),
    st.sampled_from(["2020-01-01T00:00:00Z", "2020-01-01T00:00:00.5+02:00"]),
    st.dictionaries(st.text(max_size=5), st.sampled_from(["YmFy", "", "==", "x"]), max_size=2),
)
toc_docs = st.fixed_dictionaries(
    {
        "version": st.sampled_from([1, 1, 1, 2, "1"]),
        "entries": st.lists(st.dictionaries(toc_keys, toc_values, max_size=10), max_size=8),
    }
)
_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(tail=st.binary(max_size=120), blob_size=st.integers(-5, 1 << 40))
def test_parse_footer_raises_only_format_error(tail, blob_size):
    try:
        offset, size = estargz.parse_footer(tail, blob_size)
    except FormatError:
        return
    assert size in (47, 51) and 0 <= offset < blob_size - size


@_FUZZ
@given(offset=st.integers(0, 1 << 50), cut=st.integers(0, 51), flip=st.integers(0, 50), byte=st.integers(0, 255))
def test_mutated_footers_raise_only_format_error(offset, cut, flip, byte):
    original = estargz.make_footer(offset)
    blob_size = (1 << 50) + 100
    assert estargz.parse_footer(original, blob_size) == (offset, 51)
    footer = bytearray(original)
    footer[flip] = byte
    try:
        got = estargz.parse_footer(bytes(footer[cut:]), blob_size)
    except FormatError:
        assert cut or bytes(footer) != original, "an intact footer was refused"
        return
    # Accepted: a whole footer, and the TOC offset is the one its bytes spell (a changed hex digit
    # moves it); anything else changed must still be an empty gzip member carrying STARGZ.
    assert cut == 0
    assert got == (int(footer[16:32], 16), 51)
    assert footer[32:38] == b"STARGZ" and gzip.decompress(bytes(footer)) == b""


@_FUZZ
@given(data=st.binary(max_size=2000), gz=st.booleans())
def test_parse_toc_random_bytes_raise_only_format_error(data, gz):
    if gz:
        data = gzip.compress(data)
    with pytest.raises(FormatError):
        estargz.parse_toc(data, None, toc_offset=1000)


@_FUZZ
@given(doc=toc_docs, toc_offset=st.integers(0, 400))
def test_parse_toc_random_documents_raise_only_format_error(doc, toc_offset):
    try:
        parsed = estargz.parse_toc(_toc_member(json.dumps(doc).encode()), None, toc_offset=toc_offset)
    except FormatError:
        return
    # Anything accepted is internally consistent.
    for entry in parsed.entries:
        assert entry.type in toc.ENTRY_TYPES
        assert sum(c.size for c in entry.chunks) == (entry.size if entry.chunks else 0)
        for c in entry.chunks:
            assert 0 <= c.blob_start < c.blob_end <= toc_offset


@_FUZZ
@given(data=st.binary(max_size=500), size=st.integers(1, 5000), inner=st.integers(0, 100))
def test_decompress_chunk_random_bytes_raise_only_format_error(data, size, inner):
    try:
        out = estargz.decompress_chunk(gzip.compress(data) if inner % 2 else data, _chunk(size, inner))
    except FormatError:
        return
    assert len(out) == size


# --------------------------------------------------------------------------
# Interop: stargz-snapshotter's converter produces layers our reader accepts
# --------------------------------------------------------------------------


@pytest.fixture
def containerd():
    missing = ctd.missing_binaries()
    if missing:
        pytest.skip(f"interop needs {', '.join(missing)} on PATH (Debian packages containerd, stargz-snapshotter)")
    with ctd.ContainerdProcess() as daemon:
        yield daemon


def test_ctr_remote_estargz_layers_read_and_verify(containerd, tmp_path):
    rng = random.Random(7)
    files = {
        "etc/hostname": b"als\n",
        "usr/bin/tool": rng.randbytes(5 * 65536 + 17),  # six 64 KiB chunks
        "usr/share/empty": b"",
        "usr/share/zeros": bytes(300_000),
    }
    members = [
        (_member("etc", tarfile.DIRTYPE), None),
        (_member("usr", tarfile.DIRTYPE), None),
        (_member("usr/bin", tarfile.DIRTYPE), None),
        (_member("usr/share", tarfile.DIRTYPE), None),
        (_member("usr/bin/link", tarfile.SYMTYPE, linkname="tool"), None),
    ] + [(_member(name, mode=0o755, uid=1000), data) for name, data in files.items()]
    archive = tmp_path / "in.tar"
    archive.write_bytes(ctd.build_oci_archive([_tar(members)]))

    containerd.ctr("images", "import", "--base-name", "example.com/als/t", "--digests", "--no-unpack", str(archive))
    containerd.ctr_remote(
        "image", "convert", "--estargz", "--oci", "--estargz-chunk-size", "65536",
        "example.com/als/t:latest", "example.com/als/t:esgz",
    )
    exported = tmp_path / "out.tar"
    containerd.ctr("images", "export", str(exported), "example.com/als/t:esgz")

    image = ctd.read_oci_archive(exported.read_bytes())
    [(desc, blob)] = image.layer_blobs()
    expected_toc = desc["annotations"][estargz.TOC_DIGEST_ANNOTATION]
    toc_offset, footer_size = estargz.parse_footer(blob[-estargz.FOOTER_SIZE :], len(blob))
    assert footer_size == estargz.FOOTER_SIZE
    parsed = estargz.parse_toc(blob[toc_offset : len(blob) - footer_size], expected_toc, toc_offset=toc_offset)
    assert parsed.digest == expected_toc
    raw = gzip.decompress(blob)
    assert int(desc["annotations"][estargz.UNCOMPRESSED_SIZE_ANNOTATION]) == len(raw)
    assert image.config["rootfs"]["diff_ids"] == [sha(raw)]

    by_name = {e.name: e for e in parsed.entries}
    assert by_name[estargz.NO_PREFETCH_LANDMARK].type == toc.REG
    for name, data in files.items():
        entry = by_name[name]
        assert (entry.type, entry.size, entry.mode, entry.uid, entry.mtime) == (toc.REG, len(data), 0o755, 1000, MTIME)
        assert _file_content(blob, entry) == data
        assert len(entry.chunks) == -(-len(data) // 65536)
    assert by_name["usr/bin/link"].linkname == "tool"
    assert by_name["usr/bin"].type == toc.DIR

    # Tampering with the annotation or a chunk is caught.
    with pytest.raises(VerificationError):
        estargz.parse_toc(blob[toc_offset : len(blob) - footer_size], sha(b"x"), toc_offset=toc_offset)
    chunk = by_name["usr/bin/tool"].chunks[2]
    good = estargz.decompress_chunk(blob[chunk.blob_start : chunk.blob_end], chunk)
    assert sha256_digest(good) == chunk.digest
    assert sha256_digest(good[:-1] + b"\0") != chunk.digest


def test_our_layer_survives_ctr_remote_reconversion(containerd, tmp_path):
    """Our eStargz blob, imported as an ordinary gzip layer, converts with sgz to the same files."""
    tar_bytes = _tar(_input_members())
    blob, result = _convert(tar_bytes, chunk_size=CHUNK)
    archive = tmp_path / "in.tar"
    archive.write_bytes(ctd.build_oci_archive([gzip.decompress(blob)]))
    containerd.ctr("images", "import", "--base-name", "example.com/als/ours", "--digests", "--no-unpack", str(archive))
    containerd.ctr_remote(
        "image", "convert", "--estargz", "--oci", "--estargz-chunk-size", "65536",
        "example.com/als/ours:latest", "example.com/als/ours:esgz",
    )
    exported = tmp_path / "out.tar"
    containerd.ctr("images", "export", str(exported), "example.com/als/ours:esgz")
    [(desc, theirs)] = ctd.read_oci_archive(exported.read_bytes()).layer_blobs()
    ours_toc = {e.name: e for e in _read_toc(blob, result.toc_digest).entries}
    toc_offset, _ = estargz.parse_footer(theirs[-51:], len(theirs))
    theirs_toc = estargz.parse_toc(
        theirs[toc_offset:-51], desc["annotations"][estargz.TOC_DIGEST_ANNOTATION], toc_offset=toc_offset
    )
    names = [e.name for e in theirs_toc.entries]
    # sgz drops our TOC and keeps a single landmark, like we do.
    assert estargz.TOC_NAME not in names and names.count(estargz.NO_PREFETCH_LANDMARK) == 1
    for entry in theirs_toc.entries:
        mine = ours_toc[entry.name]
        if entry.name == estargz.NO_PREFETCH_LANDMARK:
            assert mine.chunks[0].digest == entry.chunks[0].digest  # sgz writes it with mode 0
            continue
        assert (entry.type, entry.mode, entry.uid, entry.gid, entry.mtime, entry.linkname, entry.xattrs) == (
            mine.type, mine.mode, mine.uid, mine.gid, mine.mtime, mine.linkname, mine.xattrs,
        ), entry.name
        assert [(c.offset, c.size, c.digest) for c in entry.chunks] == [
            (c.offset, c.size, c.digest) for c in mine.chunks
        ], entry.name
        assert _file_content(theirs, entry) == _file_content(blob, mine)
    assert set(names) == set(ours_toc)


def test_a_toc_s_json_objects_are_freed_while_its_entries_are_built():
    """A TOC's decoded JSON is about as big as what is built from it: both whole at once would
    double the store's peak memory while a large layer resolves (its objects go as entries come)."""
    import hashlib
    import tracemalloc
    entries = [{"name": "./", "type": "dir", "mode": 0o755}]
    for i in range(20_000):
        digest = "sha256:" + hashlib.sha256(b"%d" % i).hexdigest()
        entries.append({"name": f"./usr/share/d{i // 100}/file-{i}.txt", "type": "reg", "size": 10 + i,
                        "modtime": "2024-01-02T03:04:05Z", "mode": 0o644, "uid": 0, "gid": 0, "digest": digest,
                        "offset": 1000 + 100 * i, "chunkDigest": digest, "userName": "root", "groupName": "root"})
    member = _toc_member({"version": 1, "entries": entries})
    del entries
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        parsed = estargz.parse_toc(member, None, toc_offset=1000 + 100 * 20_000)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(parsed.entries) == 20_001
    # Measured: 1.7 times what is kept at the peak (the JSON text and its objects, just decoded),
    # 2.2 times when the objects all lived until the last entry was built.
    assert peak - base < 1.9 * (kept - base), (peak - base, kept - base)
