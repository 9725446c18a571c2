"""The seekable index of ordinary gzip layers: written for a real gzip tar, served byte for byte, never wrong.

Every file of a layer made here is read back through the index (span by span,
from checkpoints that start at odd bit offsets) and compared with what tarfile
extracts; hostile indexes (moved offsets, wrong windows and digests, oversized,
overlapping and escaping entries) either are refused when parsed or fail the
read with an error, never with a wrong byte.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import random
import tarfile
import tempfile
import zlib
from pathlib import Path

import pytest

from als.errors import FormatError, VerificationError
from als.fetch.background import fill
from als.fetch.cache import ChunkCache
from als.fetch.fetcher import ChunkFetcher
from tests.fetch.support import settled
from als.fetch.source import BlobSource
from als.formats import gzindex as G
from als.formats import gzindex_writer as GW
from als.formats import lazy
from als.formats import toc as T
from tests.support import images

SPAN = 64 << 10


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sample_entries() -> list[images.Entry]:
    rnd = random.Random(17)
    words = [bytes(rnd.choices(b"abcdefghij \n", k=rnd.randrange(3, 12))) for _ in range(400)]
    entries = [images.Entry("usr", images.DIR, 0o755), images.Entry("usr/lib", images.DIR, 0o755)]
    for i in range(120):  # small and middling text files: many per span, some across span ends
        body = b"".join(rnd.choices(words, k=rnd.randrange(1, 3000)))
        entries.append(images.Entry(f"usr/lib/f{i:03d}.txt", images.FILE, 0o644, data=body))
    entries.append(images.Entry("usr/lib/random.bin", images.FILE, 0o755, data=rnd.randbytes(300_000)))
    entries.append(images.Entry("usr/lib/zeros", images.FILE, 0o644, data=bytes(500_000)))
    entries.append(images.Entry("usr/lib/empty", images.FILE, 0o644))
    entries.append(images.Entry("usr/lib/link", images.SYMLINK, 0o777, link="f000.txt"))
    entries.append(images.hardlink("usr/lib/hard", entries[2]))
    entries.append(images.Entry("usr/lib/x", images.FILE, 0o644, data=b"x",
                                xattrs={"user.k": b"v\x00\xff"}))
    return entries


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    """(tar bytes, gzip blob, its path, its digest, index blob), from one gzip -6 stream as docker writes."""
    tar = images.layer_tar(sample_entries())
    blob = gzip.compress(tar, compresslevel=6, mtime=0)
    path = tmp_path_factory.mktemp("gzindex") / "layer.gz"
    path.write_bytes(blob)
    index = GW.write_index(str(path), layer_digest=sha(blob), layer_size=len(blob), span_size=SPAN)
    return tar, blob, path, sha(blob), index


def parse(layer, index: bytes | None = None, digest: str | None = None) -> G.GzipIndex:
    _, blob, _, layer_digest, built = layer
    index = built if index is None else index
    return G.parse_index(index, digest or sha(index), layer_digest=layer_digest, layer_size=len(blob),
                         max_size=64 << 20, max_entries=1 << 20)


def doc_of(index: bytes) -> dict:
    return json.loads(gzip.decompress(index))


def blob_of(doc: dict) -> bytes:
    return gzip.compress(json.dumps(doc).encode(), mtime=0)


def tar_contents(tar: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isreg()}


def read_file(blob: bytes, entry: T.Entry) -> bytes:
    """A file's bytes as the store gets them: each chunk from its compressed range, checked."""
    out = []
    for c in entry.chunks:
        data = G.decompress_chunk(blob[c.blob_start:c.blob_end], c)
        if sha(data) != c.digest:
            raise VerificationError(f"chunk of {entry.name} does not match its digest")
        out.append(data)
    return b"".join(out)


def test_every_file_is_served_byte_exact(layer):
    tar, blob, _, _, _ = layer
    idx = parse(layer)
    assert idx.uncompressed_size == len(tar)
    files = {e.name: e for e in idx.toc.entries if e.type == T.REG}
    expected = tar_contents(tar)
    assert set(files) == set(expected)
    for name, data in expected.items():
        assert read_file(blob, files[name]) == data, name
        assert files[name].digest == (sha(data) if data else "")
    # The layer exercises what matters: several spans, files across them, checkpoints inside bytes.
    assert len(idx.checkpoints) >= 5
    assert any(len(e.chunks) > 1 for e in files.values())
    assert len({p.bit for p in idx.checkpoints if p.bit}) >= 2
    kinds = {e.name: e for e in idx.toc.entries}
    assert kinds["usr/lib/link"].type == T.SYMLINK and kinds["usr/lib/link"].linkname == "f000.txt"
    assert kinds["usr/lib/hard"].type == T.HARDLINK and kinds["usr/lib/hard"].linkname == "usr/lib/f000.txt"
    assert kinds["usr/lib/x"].xattrs == {"user.k": b"v\x00\xff"}


def test_the_store_reads_files_through_the_fetcher(layer, tmp_path):
    """The chunk fetcher (range requests, the format's decoder, digest checks, the cache) serves the index."""
    tar, blob, _, _, _ = layer
    idx = parse(layer)
    requests = []
    source = BlobSource("test layer", lambda s, e: requests.append((s, e)) or blob[s:e], idx.toc.compression,
                        [c for e in idx.toc.entries for c in e.chunks])
    fetcher = ChunkFetcher(ChunkCache(tmp_path / "cache"), readahead_min=0, readahead_max=0)
    expected = tar_contents(tar)
    for e in idx.toc.entries:
        if e.type == T.REG and e.chunks:
            assert b"".join(fetcher.read(source, e.chunks)) == expected[e.name]
    assert len(requests) <= len(idx.checkpoints)  # one range request per span, whatever its files
    assert lazy.for_compression(idx.toc.compression) is lazy.GZIP_INDEX


def _fixed_block(data: bytes) -> list[tuple[int, int]]:
    """A fixed-Huffman deflate block of literals, as (value, width) fields written LSB-first."""
    fields = [(0, 1), (1, 2)]
    for byte in data:
        code, width = (0x30 + byte, 8) if byte < 144 else (0x190 + byte - 144, 9)
        fields.append((int(f"{code:0{width}b}"[::-1], 2), width))  # Huffman codes go MSB-first
    return fields + [(0, 7)]


def _pack(fields: list[tuple[int, int]]) -> tuple[bytes, int]:
    value = count = 0
    for field, width in fields:
        value |= field << count
        count += width
    return value.to_bytes((count + 7) // 8, "little"), count


@pytest.mark.parametrize("bit", range(8))
def test_a_stream_resumes_at_any_bit_even_before_a_stored_block(bit):
    """A span starting at bit ``bit`` of a byte, followed by a stored block, inflates exactly.

    The stream: a block of literals sized so that the next block starts at
    bit ``bit``; a block of text; a stored block, which pads to the stream's
    byte boundary (shifting the stream by ``bit`` bits would move that
    boundary: exactly what breaks).
    """
    first = bytes([200]) * ((bit - 2) % 8) + b"ab"  # 10 bits of block frame + 9 per byte >= 144 + 8 per other
    text, stored = b"hello, deflate\n" * 5, random.Random(bit).randbytes(3000)
    head, start = _pack(_fixed_block(first))
    assert start % 8 == bit
    fields = _fixed_block(first) + _fixed_block(text) + [(1, 1), (0, 2)]
    body, end = _pack(fields)
    pad = (8 - end % 8) % 8
    stream = body[:(end + pad) // 8] + len(stored).to_bytes(2, "little") + (0xFFFF ^ len(stored)).to_bytes(
        2, "little") + stored
    assert zlib.decompressobj(-15).decompress(stream) == first + text + stored
    at = stream[start // 8:]
    assert G.inflate_span(at, bit, first, len(text) + len(stored)) == text + stored
    assert G.inflate_span(at, bit, first, len(text)) == text
    if bit:  # shifting the stream instead misreads the stored block
        shifted = (int.from_bytes(at, "little") >> bit).to_bytes(len(at), "little")
        d = zlib.decompressobj(-15, zdict=first)
        with pytest.raises(zlib.error):
            assert d.decompress(shifted, len(text) + len(stored)) == text + stored
            raise zlib.error("inflated, but to other bytes")


def test_resumes_at_every_checkpoint_of_a_real_stream(layer):
    tar, blob, path, _, _ = layer
    points, usize = GW.seek_points(str(path), SPAN)
    assert usize == len(tar)
    for i, p in enumerate(points):
        end = points[i + 1].uncompressed_offset if i + 1 < len(points) else usize
        window = tar[max(0, p.uncompressed_offset - G.WINDOW):p.uncompressed_offset]
        out = G.inflate_span(blob[p.offset:], p.bit, window, end - p.uncompressed_offset)
        assert out == tar[p.uncompressed_offset:end]
    with pytest.raises(FormatError):  # one bit off: not the stream any more
        p = next(p for p in points if p.uncompressed_offset)
        window = tar[p.uncompressed_offset - G.WINDOW:p.uncompressed_offset]
        out = G.inflate_span(blob[p.offset:], (p.bit + 1) % 8, window, 1 << 16)
        assert out == tar[p.uncompressed_offset:p.uncompressed_offset + (1 << 16)]
        raise FormatError("inflated, but to other bytes")


def test_concatenated_gzip_members_are_refused(tmp_path):
    tar = images.layer_tar(sample_entries()[:20])
    path = tmp_path / "two.gz"
    blob = gzip.compress(tar[:len(tar) // 2], mtime=0) + gzip.compress(tar[len(tar) // 2:], mtime=0)
    path.write_bytes(blob)
    with pytest.raises(FormatError, match="single gzip member"):  # where a span ends it, or the trailer
        GW.write_index(str(path), layer_digest=sha(blob), layer_size=len(blob), span_size=SPAN)


def test_not_gzip_is_refused(tmp_path):
    path = tmp_path / "plain.tar"
    path.write_bytes(images.layer_tar(sample_entries()[:5]))
    with pytest.raises(FormatError, match="cannot be indexed"):
        GW.write_index(str(path), layer_digest=sha(b""), layer_size=path.stat().st_size, span_size=SPAN)


# ---- hostile indexes: refused when parsed ------------------------------------------------


def test_a_digest_the_annotation_does_not_name_is_refused(layer):
    with pytest.raises(VerificationError):
        parse(layer, digest=sha(b"other"))


def _refused(layer, mutate, match: str) -> None:
    doc = doc_of(layer[4])
    mutate(doc)
    with pytest.raises(FormatError, match=match):
        parse(layer, blob_of(doc))


def _file(doc: dict, name: str) -> dict:
    return next(e for e in doc["entries"] if e["name"] == name)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d["layer"].update(digest=sha(b"x")), "is for layer"),
    (lambda d: d["layer"].update(size=d["layer"]["size"] + 1), "is for layer"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d["checkpoints"][1].update(offset=d["checkpoints"][0]["offset"], bit=0), "does not follow"),
    (lambda d: d["checkpoints"][2].update(bit=8), "'bit'"),
    (lambda d: d["checkpoints"][0].update(uncompressedOffset=1), "not 0"),
    (lambda d: d["checkpoints"][1].update(offset=10 ** 12), "'offset'"),
    (lambda d: d["checkpoints"][1].update(window=base64.b64encode(zlib.compress(b"short")[2:-4]).decode()),
     "window is"),
    (lambda d: d["checkpoints"][1].update(window="!!"), "base64"),
    (lambda d: d["checkpoints"][1].update(digest="sha256:" + "0" * 63), "digest"),
    (lambda d: d.update(uncompressedSize=d["uncompressedSize"] + (64 << 20)), "last span"),
    (lambda d: _file(d, "usr/lib/zeros").update(size=10 ** 12), "run past"),
    (lambda d: _file(d, "usr/lib/zeros").pop("offset"), "'offset'"),
    (lambda d: _file(d, "usr/lib/f001.txt").update(offset=_file(d, "usr/lib/f000.txt")["offset"]), "overlaps"),
    (lambda d: _file(d, "usr/lib/f001.txt").update(name="../../etc/passwd"), "climbs"),
    (lambda d: _file(d, "usr/lib/hard").update(linkName="../../../etc/shadow"), "climbs"),
    (lambda d: _file(d, "usr/lib/random.bin").pop("chunkDigests"), "chunkDigests"),
    (lambda d: _file(d, "usr/lib/f000.txt").update(chunkDigests=[sha(b"")] * 2), "chunkDigests"),
    (lambda d: _file(d, "usr/lib/f000.txt").update(digest="md5:00"), "digest"),
    (lambda d: d["entries"].append({"name": "usr/lib/zeros", "type": "chunk"}), "chunk entries"),
    (lambda d: d["checkpoints"].__setitem__(slice(None), []), "non-empty list"),
    (lambda d: d.update(checkpoints=d["checkpoints"] * 50), "checkpoints for"),
])
def test_a_malformed_index_is_refused(layer, mutate, match):
    _refused(layer, mutate, match)


def test_an_index_bomb_is_refused(layer, monkeypatch):
    monkeypatch.setattr(G, "MAX_INDEX_JSON", 1 << 16)
    with pytest.raises(FormatError, match="inflates to more than"):
        parse(layer)


def test_too_many_entries_are_refused(layer):
    _, blob, _, layer_digest, index = layer
    with pytest.raises(FormatError, match="over the limit"):
        G.parse_index(index, sha(index), layer_digest=layer_digest, layer_size=len(blob), max_size=64 << 20,
                      max_entries=10)


# ---- hostile indexes that parse: every read fails, none is wrong -------------------------


def _streamed(blob: bytes, piece: int):
    """A blob source's stream: the range handed over ``piece`` bytes at a time, as a network read would."""
    def stream(start: int, end: int, sink) -> int:
        for at in range(start, end, piece):
            sink(blob[at:min(at + piece, end)])
        return end - start
    return stream


def _served_or_failed(layer, doc: dict, tmp_path=None, piece: int = 0) -> int:
    """Read every file through the hostile index; returns how many reads failed. A wrong byte fails the test.

    With ``tmp_path``, the files are read as the store reads them: through the chunk fetcher, each span
    streamed ``piece`` bytes at a time (spans cut short for odd ``piece``); otherwise each chunk on its own.
    """
    tar, blob = layer[0], layer[1]
    idx = parse(layer, blob_of(doc))
    expected = tar_contents(tar)
    files = [e for e in idx.toc.entries if e.type == T.REG and e.chunks]
    if tmp_path is not None:
        source = BlobSource("test layer", lambda s, e: blob[s:e], idx.toc.compression,
                            [c for e in files for c in e.chunks], stream_range=_streamed(blob, piece))
        # a cold cache each time; odd piece sizes with [fetch] span_cut on
        fetcher = ChunkFetcher(ChunkCache(Path(tempfile.mkdtemp(dir=tmp_path))), span_cut=piece % 2 == 1)
        read = lambda e: b"".join(fetcher.read(source, e.chunks))  # noqa: E731
    else:
        read = lambda e: read_file(blob, e)  # noqa: E731
    failed = 0
    for e in files:
        try:
            data = read(e)
        except (FormatError, VerificationError):
            failed += 1
            continue
        assert data == expected[e.name], f"{e.name}: served wrong bytes"
    return failed


_LIES = {
    "offset": lambda d: d["checkpoints"][2].update(offset=d["checkpoints"][2]["offset"] - 1),
    "bit": lambda d: d["checkpoints"][2].update(bit=(d["checkpoints"][2]["bit"] + 3) % 8),
    "window": lambda d: d["checkpoints"][2].update(
        window=base64.b64encode(zlib.compress(bytes(G.WINDOW))[2:-4]).decode()),
    "file-offset": lambda d: _file(d, "usr/lib/f010.txt").update(offset=_file(d, "usr/lib/f010.txt")["offset"] + 1),
    "file-digest": lambda d: _file(d, "usr/lib/f010.txt").update(digest=_file(d, "usr/lib/f011.txt")["digest"]),
    "file-size": lambda d: _file(d, "usr/lib/f010.txt").update(size=_file(d, "usr/lib/f010.txt")["size"] - 1),
}


@pytest.mark.parametrize("mutate", list(_LIES.values()), ids=list(_LIES))
def test_a_lying_index_fails_reads_and_never_serves_a_wrong_byte(layer, mutate):
    doc = doc_of(layer[4])
    mutate(doc)
    assert _served_or_failed(layer, doc) > 0


@pytest.mark.parametrize("piece", [1, 777, 1 << 20])
@pytest.mark.parametrize("mutate", list(_LIES.values()), ids=list(_LIES))
def test_a_lying_index_never_serves_a_wrong_byte_through_the_streaming_fetch(layer, tmp_path, mutate, piece):
    """The fetcher hands pieces out as the span streams in: whatever the stream's piece size, the lie fails."""
    doc = doc_of(layer[4])
    mutate(doc)
    assert _served_or_failed(layer, doc, tmp_path, piece) > 0


@pytest.mark.parametrize("piece", [0, 1, 4096])
def test_a_file_is_vouched_for_by_its_own_digest_not_its_span(layer, tmp_path, piece):
    """A span's digest is not checked before its files are served (that would need the whole span, and
    make what is served depend on how much was read): each piece matches its own digest, so a wrong span
    digest serves exactly the right bytes, and a wrong piece digest fails that file alone."""
    doc = doc_of(layer[4])
    doc["checkpoints"][1]["digest"] = sha(b"not this span")
    assert _served_or_failed(layer, doc, tmp_path if piece else None, piece) == 0
    doc = doc_of(layer[4])
    first = _span_with_files(parse(layer))[0].name  # the files after it in its span come in the same fetch
    _file(doc, first).update(digest=sha(b"not this file"))
    assert _served_or_failed(layer, doc, tmp_path if piece else None, piece) == 1


def test_a_small_file_is_served_before_its_span_is_all_in(layer, tmp_path):
    """A file near its checkpoint costs the bytes up to it, not its whole span's."""
    blob = layer[1]
    idx = parse(layer)
    files = [e for e in idx.toc.entries if e.type == T.REG and e.chunks]
    first = next(e for e in files if len(e.chunks) == 1 and e.chunks[0].blob_end - e.chunks[0].blob_start > 16384
                 and e.chunks[0].inner_offset + e.size < e.chunks[0].span.size // 4)
    chunk = first.chunks[0]
    fetcher = ChunkFetcher(ChunkCache(tmp_path / "cache"))
    seen = []

    def stream(start: int, end: int, sink) -> int:
        for at in range(start, end, 1024):
            sink(blob[at:min(at + 1024, end)])
            seen.append((min(at + 1024, end), fetcher.cache.contains(chunk.digest)))
        return end - start

    source = BlobSource("test layer", lambda s, e: blob[s:e], idx.toc.compression,
                        [c for e in files for c in e.chunks], stream_range=stream)
    assert fetcher.read(source, [chunk]) == [tar_contents(layer[0])[first.name]]
    delivered_at = next(at for at, cached in seen if cached)
    assert delivered_at < chunk.blob_start + (chunk.blob_end - chunk.blob_start) // 2


def test_a_chunk_alone_inflates_its_span_only_up_to_its_end(layer, monkeypatch):
    """Without the fetcher's stream (``decompress_chunk`` on a chunk's range), inflating stops at the
    chunk's end: the first file of a span costs its bytes, not the span's."""
    blob = layer[1]
    idx = parse(layer)
    chunk = next(c for e in idx.toc.entries for c in e.chunks if c.inner_offset < 4096 and c.span.size > 1 << 16)
    inflated = []
    real = zlib.decompressobj

    class Counting:
        def __init__(self, *args, **kwargs):
            self.d = real(*args, **kwargs)

        def decompress(self, data, max_length=0):
            out = self.d.decompress(data, max_length)
            inflated.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self.d, name)

    monkeypatch.setattr(G.zlib, "decompressobj", Counting)
    G.decompress_chunk(blob[chunk.blob_start:chunk.blob_end], chunk)
    assert sum(inflated) <= chunk.inner_offset + chunk.size + G.WINDOW  # the window's unpacking included


@pytest.mark.parametrize("step", [1, 4 << 20])
def test_the_background_fetch_takes_each_span_once_then_reads_stay_local(layer, tmp_path, step):
    """Every chunk of a span rides along with the first one, even when a step is smaller than a span."""
    import threading

    tar, blob, _, _, _ = layer
    idx = parse(layer)
    requests = []
    source = BlobSource("test layer", lambda s, e: requests.append((s, e)) or blob[s:e], idx.toc.compression,
                        [c for e in idx.toc.entries for c in e.chunks])
    fetcher = ChunkFetcher(ChunkCache(tmp_path / "cache"))
    fetched = fill(fetcher, source, threading.Event(), step=step)
    assert fetched <= len(blob)
    assert len(requests) <= len(idx.checkpoints)
    assert sorted(set(requests)) == sorted(requests)  # no range twice
    del requests[:]
    expected = tar_contents(tar)
    for e in idx.toc.entries:
        if e.type == T.REG and e.chunks:
            assert b"".join(fetcher.read(source, e.chunks)) == expected[e.name]
    assert requests == []


def _span_with_files(idx: G.GzipIndex):
    """A span of at least 16 KiB compressed whose first file ends in its first quarter, and its files in order."""
    files = [e for e in idx.toc.entries if e.type == T.REG and len(e.chunks) == 1]
    for e in files:
        c = e.chunks[0]
        if c.blob_end - c.blob_start > 16384 and c.inner_offset + c.size < c.span.size // 4:
            same = [f for f in files if f.chunks[0].span is c.span]
            if len(same) >= 3:
                return sorted(same, key=lambda f: f.chunks[0].inner_offset)
    raise AssertionError("the sample layer has no such span")


def test_a_read_fetches_its_span_only_as_far_as_the_file_and_the_rest_comes_when_read(layer, tmp_path, monkeypatch):
    """A small file near its checkpoint costs its share of the span (plus a margin), not the span; the
    files after it that did not come along are fetched when read, and every byte is right."""
    import als.fetch.rundecoder as F

    monkeypatch.setattr(F, "SPAN_SLACK", 1024)  # the sample's spans are small: keep the margin small too
    tar, blob = layer[0], layer[1]
    idx = parse(layer)
    files = _span_with_files(idx)
    requests = []
    source = BlobSource("test layer", lambda s, e: requests.append((s, e)) or blob[s:e], idx.toc.compression,
                        [c for e in idx.toc.entries for c in e.chunks])
    fetcher = ChunkFetcher(ChunkCache(tmp_path / "cache"), span_cut=True)
    expected = tar_contents(tar)
    first = files[0].chunks[0]
    assert fetcher.read(source, files[0].chunks) == [expected[files[0].name]]
    assert len(requests) == 1 and requests[0][0] == first.blob_start and requests[0][1] < first.blob_end, requests
    last = files[-1]
    assert not fetcher.cache.contains(last.chunks[0].digest)
    settled(fetcher)  # the files it stopped short of left no claim behind
    for e in files:
        assert b"".join(fetcher.read(source, e.chunks)) == expected[e.name]
    settled(fetcher)
    # read one after another, the span's files cost its prefix twice at most: the second miss takes it whole
    assert len(requests) == 2 and requests[1] == (first.blob_start, first.blob_end), requests


def test_a_reader_waiting_for_a_file_the_fetch_stopped_short_of_fetches_it(layer, tmp_path, monkeypatch):
    """Another reader's fetch claimed the file along with its own and then stopped before it: the
    waiting reader fetches it itself, and gets the right bytes."""
    import threading
    import time

    import als.fetch.rundecoder as F

    monkeypatch.setattr(F, "SPAN_SLACK", 1024)
    tar, blob = layer[0], layer[1]
    idx = parse(layer)
    files = _span_with_files(idx)
    fetcher = ChunkFetcher(ChunkCache(tmp_path / "cache"), span_cut=True)
    expected = tar_contents(tar)
    second: dict = {}

    def read_last():
        try:
            second["data"] = b"".join(fetcher.read(source, files[-1].chunks))
        except Exception as e:  # reported below
            second["error"] = e

    thread = threading.Thread(target=read_last)

    def stream(start: int, end: int, sink) -> int:
        if not thread.is_alive() and "data" not in second and "error" not in second:
            thread.start()  # it finds the last file claimed by this fetch, and waits for it
            time.sleep(0.3)
        sink(blob[start:end])
        return end - start

    source = BlobSource("test layer", lambda s, e: blob[s:e], idx.toc.compression,
                        [c for e in idx.toc.entries for c in e.chunks], stream_range=stream)
    assert fetcher.read(source, files[0].chunks) == [expected[files[0].name]]
    thread.join(30)
    assert not thread.is_alive()
    assert second.get("data") == expected[files[-1].name], second.get("error")
    settled(fetcher)
