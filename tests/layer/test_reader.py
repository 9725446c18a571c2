"""The layer reader's read policy, in process: a real eStargz blob, the real fetcher and disk cache.

What a read fetches besides its own chunks (a program whole, a small file's
small neighbours), whether it would wait (asked by FUSE reader threads that
never do, and must not fetch), what it records for `als optimize`, the
startup prediction a program's first read starts, and a verification failure
named in the log by file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import threading
import time
from types import SimpleNamespace

import pytest

from als.errors import ALSError
from als.fetch.cache import ChunkCache
from als.fetch.fetcher import ChunkFetcher
from als.fetch.source import BlobSource
from als.formats import estargz
from als.layer.access import AccessRecorder
from als.layer.reader import LayerReader
from als.layer.resolved import Layer, LayerDescriptor
from als.layer.startup import Predictor, elf_needs_of
from als.layer.view import LayerView
from als.tools.image import estargz_layer
from tests.fetch.support import settled
from tests.support import images

CHUNK = 64 << 10
REF = "registry.test/reader:1"


class Blob:
    """An eStargz blob held in memory, serving ranges as a registry would and counting the requests."""

    def __init__(self, entries: list[images.Entry], tamper: str = "", chunk_size: int = CHUNK):
        built = estargz_layer(io.BytesIO(images.layer_tar(entries)), chunk_size=chunk_size)
        built.blob.seek(0)
        self.data = bytearray(built.blob.read())
        self.digest = built.digest
        self.files = {e.path: e.data for e in entries if e.type == images.FILE}
        toc_offset, footer = estargz.parse_footer(bytes(self.data[-estargz.FOOTER_SIZE:]), len(self.data))
        self.toc = estargz.parse_toc(bytes(self.data[toc_offset:len(self.data) - footer]), None,
                                     toc_offset=toc_offset)
        self.view = LayerView(self.toc.entries)
        if tamper:  # flip a byte in the middle of the file's first chunk: it no longer matches its digest
            c = self.view.lookup(tamper.split("/")).chunks[0]
            self.data[(c.blob_start + c.blob_end) // 2] ^= 0xFF
        self.requests: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def read_range(self, start: int, end: int) -> bytes:
        with self._lock:
            self.requests.append((start, end))
        return bytes(self.data[start:end])

    def layer(self) -> Layer:
        desc = LayerDescriptor(0, self.digest, len(self.data), "application/vnd.oci.image.layer.v1.tar+gzip", {},
                               "sha256:" + hashlib.sha256(b"").hexdigest())
        source = BlobSource(f"image {REF} layer {self.digest}", self.read_range, self.toc.compression,
                            self.view.chunks())
        return Layer(REF, desc, "", 0, self.view, source)


def dirs(*paths: str) -> list[images.Entry]:
    return [images.Entry(p, images.DIR, 0o755) for p in paths]


def fetcher_for(tmp_path) -> ChunkFetcher:
    # no adaptive read-ahead: what a read brings along is the reader's choice alone
    return ChunkFetcher(ChunkCache(tmp_path / "cache"), readahead_max=0, file_readahead=8 << 20,
                        dir_readahead=8 << 20)


def open_file(reader: LayerReader, layer: Layer, path: str):
    parts = path.split("/")
    return reader.open(layer, layer.view.lookup(parts), path, layer.view.lookup(parts[:-1]))


@pytest.fixture
def tree():
    return Blob(dirs("bin", "lib", "data", "py") + [
        images.Entry("bin/tool", mode=0o755, data=os.urandom(3 * CHUNK)),
        images.Entry("lib/libx.so.1", data=os.urandom(3 * CHUNK)),
        images.Entry("data/big.bin", data=os.urandom(3 * CHUNK)),
        *(images.Entry(f"py/m{i}.py", data=os.urandom(4096)) for i in range(5)),
        images.Entry("py/zz.bin", data=os.urandom(2 * CHUNK)),
    ])


def test_a_program_or_library_comes_whole_on_its_first_miss_and_a_data_file_does_not(tmp_path, tree):
    layer = tree.layer()
    reader = LayerReader(fetcher_for(tmp_path), AccessRecorder())
    for path in ("bin/tool", "lib/libx.so.1", "data/big.bin"):
        f = open_file(reader, layer, path)
        before = len(tree.requests)
        assert not f.ready(0, 4096) and not f.ready(2 * CHUNK, 4096)
        assert len(tree.requests) == before  # asking whether a read would wait fetches nothing
        node = layer.view.lookup(path.split("/"))
        assert f.read(0, 4096) == tree.files[path][:4096]
        settled(reader.fetcher)
        assert len(tree.requests) == before + 1
        assert f.ready(2 * CHUNK, 4096) == (path != "data/big.bin"), path
        assert f.read(2 * CHUNK + 5, CHUNK) == tree.files[path][2 * CHUNK + 5:node.size]


def test_a_small_file_brings_the_small_files_after_it_in_its_directory(tmp_path, tree):
    layer = tree.layer()
    reader = LayerReader(fetcher_for(tmp_path), AccessRecorder())
    listed = []  # the directory's small files are listed for a miss only, not for a cached read
    small_files = reader.small_files
    reader.small_files = lambda d: listed.append(d) or small_files(d)
    files = {n: open_file(reader, layer, f"py/{n}") for n in ("m0.py", "m1.py", "m4.py", "zz.bin")}
    assert files["m1.py"].read(0, 10) == tree.files["py/m1.py"][:10]
    settled(reader.fetcher)
    assert len(tree.requests) == 1 and len(listed) == 1
    assert files["m4.py"].ready(0, 4096) and not files["zz.bin"].ready(0, 4096)
    assert files["m4.py"].read(0, 4096) == tree.files["py/m4.py"]
    assert len(tree.requests) == 1 and len(listed) == 1


def test_a_read_is_answered_before_the_small_files_it_brings_along_are_in(tmp_path):
    blob = Blob(dirs("py") + [images.Entry("py/a.py", data=os.urandom(4096)),
                              images.Entry("py/big.bin", data=os.urandom(3 * CHUNK)),  # past the coalesce gap
                              images.Entry("py/b.py", data=os.urandom(4096))])
    layer = blob.layer()
    far = layer.view.lookup(["py", "b.py"]).chunks[0].blob_start
    release = threading.Event()
    read_range = layer.source.read_range

    def held(start, end):
        if start == far:
            release.wait(10)
        return read_range(start, end)

    layer.source.read_range = held
    reader = LayerReader(fetcher_for(tmp_path), AccessRecorder())
    answered = []
    t = threading.Thread(target=lambda: answered.append(open_file(reader, layer, "py/a.py").read(0, 4096)))
    t.start()
    t.join(5)
    early = not t.is_alive()  # answered while the small file past the gap was still on its way
    release.set()
    t.join(10)
    assert early and answered == [blob.files["py/a.py"]]
    settled(reader.fetcher)
    assert sorted(s for s, _ in blob.requests)[1] == far  # past the coalesce gap: a request of its own
    assert len(blob.requests) == 2 and open_file(reader, layer, "py/b.py").ready(0, 4096)


def test_reads_are_recorded_by_path_while_recording_is_on(tmp_path, tree):
    layer = tree.layer()
    recorder = AccessRecorder()
    reader = LayerReader(fetcher_for(tmp_path), recorder)
    open_file(reader, layer, "data/big.bin").read(0, 10)
    recorder.control(enable=True)
    open_file(reader, layer, "py/m3.py").read(0, 10)
    open_file(reader, layer, "bin/tool").read(1 << 30, 10)  # past the end: nothing to fetch, still opened
    assert recorder.profile(REF)["order"] == ["py/m3.py", "bin/tool"]


def test_a_chunk_that_fails_verification_is_an_error_naming_the_file(tmp_path, caplog):
    blob = Blob(dirs("d") + [images.Entry("d/lies", data=os.urandom(2 * CHUNK))], tamper="d/lies")
    layer = blob.layer()
    f = open_file(LayerReader(fetcher_for(tmp_path), AccessRecorder()), layer, "d/lies")
    with caplog.at_level(logging.ERROR, logger="als.read"), pytest.raises(ALSError):
        f.read(0, 4096)
    assert f"layer {blob.digest} file /d/lies: read failed" in caplog.text
    assert not f.ready(0, 4096)  # nothing of it was cached


def test_the_first_read_of_a_program_fetches_its_libraries(tmp_path):
    prog = os.path.realpath(shutil.which("true") or "/bin/true")
    interp, needed = elf_needs_of(open(prog, "rb").read())
    libdir = "usr/lib/x86_64-linux-gnu"
    if not interp or not needed or not all(os.path.exists(f"/{libdir}/{n}") for n in needed):
        pytest.skip("needs a dynamically linked true(1) with its libraries in /usr/lib/x86_64-linux-gnu")
    entries = dirs("usr", "usr/bin", "usr/lib", libdir) + [
        images.Entry("usr/bin/true", mode=0o755, data=open(prog, "rb").read()),
        *(images.Entry(f"{libdir}/{n}", data=open(f"/{libdir}/{n}", "rb").read()) for n in needed)]
    blob = Blob(entries)
    layer = blob.layer()
    fetcher = fetcher_for(tmp_path)
    predictor = Predictor(fetcher, 16 << 20)
    try:
        reader = LayerReader(fetcher, AccessRecorder(), predictor)
        libs = [open_file(reader, layer, f"{libdir}/{n}") for n in needed]
        assert not any(lib.ready(0, 4096) for lib in libs)
        open_file(reader, layer, "usr/bin/true").read(0, 4096)
        deadline = time.monotonic() + 30
        while not all(lib.ready(0, 4096) for lib in libs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(lib.ready(0, 4096) for lib in libs)
    finally:
        predictor.close()


def test_a_program_found_cached_is_not_read_again_for_its_libraries(tmp_path):
    """The predictor hears of a program only when its read misses: one already cached (an optimized
    image's prefetch brought it) would have its ELF header read from the disk cache for nothing,
    while the program it serves starts."""
    blob = Blob(dirs("bin") + [images.Entry(f"bin/{n}", mode=0o755, data=os.urandom(3 * CHUNK)) for n in ("a", "b")])
    layer = blob.layer()
    fetcher = fetcher_for(tmp_path)
    told = []
    predictor = SimpleNamespace(after_exec=lambda _, node, path: told.append((node, path)))
    reader = LayerReader(fetcher, AccessRecorder(), predictor)
    open_file(LayerReader(fetcher, AccessRecorder()), layer, "bin/b").read(0, 4096)  # comes whole
    settled(fetcher)
    a, b = (open_file(reader, layer, f"bin/{n}") for n in ("a", "b"))
    assert b.ready(0, 3 * CHUNK) and not a.ready(0, 4096)
    assert a.read(0, 4096) == blob.files["bin/a"][:4096] and b.read(0, 4096) == blob.files["bin/b"][:4096]
    assert told == [(a.node, "bin/a")]  # by its path too: an interpreter is known by its name


def test_a_page_read_back_from_the_disk_cache_is_checked_by_its_block_and_fetched_again_if_damaged(tmp_path):
    """The kernel drops pages it cached; read again, one comes from the disk cache by its block
    (no request), checked: a block damaged on disk is fetched again, never served."""
    blob = Blob(dirs("d") + [images.Entry("d/big.bin", data=os.urandom(600 << 10))], chunk_size=512 << 10)
    layer = blob.layer()
    cache = ChunkCache(tmp_path / "cache", memory_bytes=0)  # nothing held in memory: every hit reads the disk
    reader = LayerReader(ChunkFetcher(cache, readahead_max=0), AccessRecorder())
    f = open_file(reader, layer, "d/big.bin")
    want = blob.files["d/big.bin"]
    assert f.read(0, 4096) == want[:4096]
    settled(reader.fetcher)
    assert cache.flush()
    requests = len(blob.requests)
    assert f.read(200_000, 4096) == want[200_000:204_096] and len(blob.requests) == requests
    pack, offset, _ = cache.location(layer.view.lookup(["d", "big.bin"]).chunks[0].digest)
    raw = bytearray(pack.read_bytes())
    raw[offset + 300_000] ^= 0x01
    pack.write_bytes(bytes(raw))
    assert f.read(299_000, 4096) == want[299_000:303_096]
    assert cache.corrupt == 1 and len(blob.requests) == requests + 1
