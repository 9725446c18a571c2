"""The chunk cache on a real directory: packs, verification on read, crash damage, a full disk."""

import hashlib
import os
import subprocess

import pytest

from als.fetch.blocks import BLOCK
from als.fetch.cache import ChunkCache, sha256_digest
from als.fetch.packs import MAGIC, RECORD_SIZE, Pack


def chunks(n, size=5000, seed=0):
    blobs = [bytes([seed + i]) * size for i in range(n)]
    return blobs, [sha256_digest(b) for b in blobs]


def filled(root, n=3, **kw):
    blobs, digests = chunks(n)
    cache = ChunkCache(root, memory_bytes=0, **kw)
    for d, b in zip(digests, blobs):
        cache.put(d, b)
    assert cache.flush()
    return cache, blobs, digests


def index_of(pack):
    return pack.with_suffix(".index")


def test_put_get_and_survives_a_new_instance(tmp_path):
    data = b"hello chunk" * 1000
    d = sha256_digest(data)
    first = ChunkCache(tmp_path)
    first.put(d, data)
    assert first.flush()
    fresh = ChunkCache(tmp_path, memory_bytes=0)
    assert fresh.get(d) == data
    assert fresh.get(sha256_digest(b"other")) is None


def test_chunks_share_one_pack_file(tmp_path):
    cache, blobs, digests = filled(tmp_path, n=20)
    packs = {cache.location(d)[0] for d in digests}
    assert len(packs) == 1 and sorted(p.name for p in (tmp_path / "packs").iterdir()) == sorted(
        [packs.pop().name, index_of(cache.location(digests[0])[0]).name])


@pytest.mark.parametrize("damage", ["flip", "plant"])
def test_a_damaged_chunk_is_never_served_and_its_pack_is_dropped(tmp_path, damage):
    cache, blobs, digests = filled(tmp_path)
    pack, offset, length = cache.location(digests[1])
    raw = bytearray(pack.read_bytes())
    if damage == "flip":  # a bit flip on disk
        raw[offset + length // 2] ^= 0x01
    else:  # other bytes planted in its place
        raw[offset:offset + length] = os.urandom(length)
    pack.write_bytes(bytes(raw))
    assert cache.get(digests[1]) is None and cache.corrupt == 1
    assert not pack.exists() and not index_of(pack).exists()
    assert not any(cache.contains(d) for d in digests)  # the whole pack went: its chunks are fetched again
    assert ChunkCache(tmp_path, memory_bytes=0).stats().entries == 0


def test_a_pack_cut_short_mid_chunk_loses_that_chunk_only(tmp_path):
    cache, blobs, digests = filled(tmp_path)
    pack, offset, length = cache.location(digests[2])
    os.truncate(pack, offset + length // 2)  # the disk kept the record but not all of the chunk
    fresh = ChunkCache(tmp_path, memory_bytes=0)
    assert not fresh.contains(digests[2]) and fresh.get(digests[2]) is None
    assert [fresh.get(d) for d in digests[:2]] == blobs[:2]
    assert fresh.corrupt == 0  # found when the index was read, not by hashing


@pytest.mark.parametrize("damage", ["cut", "torn", "garbage", "middle"])
def test_an_index_cut_short_or_torn_loses_its_tail_only(tmp_path, damage):
    cache, blobs, digests = filled(tmp_path)
    index = index_of(cache.location(digests[0])[0])
    raw = bytearray(index.read_bytes())
    assert len(raw) == len(MAGIC) + 3 * RECORD_SIZE
    last = len(MAGIC) + 2 * RECORD_SIZE
    if damage == "cut":  # the last record half written
        del raw[-RECORD_SIZE // 2:]
    elif damage == "torn":  # the last record names the first chunk's bytes: only its CRC tells
        raw[last + 32:last + 40] = (0).to_bytes(8, "little")
    elif damage == "garbage":  # a record of someone else's bytes appended
        raw += os.urandom(RECORD_SIZE)
    else:  # a record in the middle damaged: everything after it is lost too
        raw[len(MAGIC) + RECORD_SIZE + 5] ^= 0x10
    index.write_bytes(bytes(raw))
    fresh = ChunkCache(tmp_path, memory_bytes=0)
    kept = 1 if damage == "middle" else 2 if damage in ("cut", "torn") else 3
    assert fresh.stats().entries == kept
    assert [fresh.contains(d) for d in digests] == [i < kept for i in range(3)]
    assert [fresh.get(d) for d in digests[:kept]] == blobs[:kept] and fresh.corrupt == 0


def test_a_kill_between_a_chunk_and_its_record_leaves_nothing_readable(tmp_path):
    cache, blobs, digests = filled(tmp_path)
    pack = cache.location(digests[0])[0]
    named = pack.stat().st_size
    with open(pack, "ab") as f:  # a chunk's bytes written, the process killed before its record
        f.write(b"half a chunk" * 100)
    cache.close()  # the process is gone: its pack is no longer locked
    fresh = ChunkCache(tmp_path, memory_bytes=0)
    assert fresh.stats().entries == 3 and fresh.stats().bytes == named
    assert pack.stat().st_size == named  # the unnamed bytes are cut off
    more, more_digests = chunks(2, seed=100)
    for d, b in zip(more_digests, more):
        fresh.put(d, b)
    assert fresh.flush()
    again = ChunkCache(tmp_path, memory_bytes=0)
    assert [again.get(d) for d in digests + more_digests] == blobs + more
    assert fresh.location(more_digests[0])[0] != pack  # a new pack: an old one is never appended to


def test_the_pack_another_process_writes_is_read_but_left_alone(tmp_path):
    cache, blobs, digests = filled(tmp_path)  # its writer holds the current pack
    other = ChunkCache(tmp_path, memory_bytes=0)  # `als cache prune` while the store runs
    assert other.get(digests[0]) == blobs[0]
    assert other.prune(0) == 0 and other.stats().entries == 3
    more, more_digests = chunks(1, seed=50)
    cache.put(more_digests[0], more[0])
    assert cache.flush()
    assert cache.get(more_digests[0]) == more[0] and cache.location(more_digests[0])[0].exists()


def test_crash_leftovers_and_the_old_format_are_removed_at_start(tmp_path):
    cache, blobs, digests = filled(tmp_path)
    packs = tmp_path / "packs"
    (packs / "stray.tmp").write_bytes(b"half")
    (packs / f"{99:016x}.pack").write_bytes(b"bytes without an index")
    (packs / f"{98:016x}.index").write_bytes(b"an index of another format")
    (packs / f"{98:016x}.pack").write_bytes(b"x")
    old = tmp_path / "chunks" / "sha256" / "ab"
    old.mkdir(parents=True)
    (old / ("ab" * 32)).write_bytes(b"a chunk of the old format")
    del cache
    fresh = ChunkCache(tmp_path, memory_bytes=0)
    assert sorted(p.name for p in packs.iterdir()) == [f"{0:016x}.index", f"{0:016x}.pack"]
    assert not (tmp_path / "chunks").exists()
    assert [fresh.get(d) for d in digests] == blobs


def test_unwritable_disk_keeps_serving_from_memory(tmp_path):
    c = ChunkCache(tmp_path)
    (tmp_path / "packs").rmdir()
    (tmp_path / "packs").write_text("not a directory")  # every write now fails
    data = b"z" * 100
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    c.put(d, data)
    assert c.flush()
    assert c.get(d) == data and c.location(d) is None


def test_a_full_disk_evicts_least_recently_used_and_stores_the_new_chunk(tmp_path):
    from tests.support.store_process import is_mounted
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(root)], check=True, timeout=30)
    cache = None
    try:
        cache = ChunkCache(root, memory_bytes=0)  # no byte limit: only the disk says no
        blobs = [os.urandom(100_000) for _ in range(12)]
        digests = [sha256_digest(b) for b in blobs]
        for d, b in zip(digests[:8], blobs[:8]):
            cache.put(d, b)
        assert cache.flush()
        with open(root / "filler", "wb") as f:  # another process fills the rest of the disk
            try:
                while True:
                    f.write(bytes(64 << 10))
                    f.flush()
            except OSError:
                pass
        cache.put(digests[8], blobs[8])
        assert cache.flush()
        assert cache.location(digests[8]) is not None  # stored, after making room
        assert cache.get(digests[8]) == blobs[8]
        assert not cache.contains(digests[0])  # the least recently used (pack) went first
        assert cache.stats().evicted >= 1
        cache.close()
        check = ChunkCache(root, memory_bytes=0)
        assert check.verify() == (1, 0)
        check.close()
    finally:
        if cache is not None:
            cache.close()  # its open packs would keep the file system busy
        subprocess.run(["umount", str(root)], timeout=30)
        assert not is_mounted(root)


def test_a_writer_behind_and_busy_leaves_a_chunk_out_instead_of_holding_it(tmp_path):
    """Past pending_bytes, put writes the chunk itself, unless another thread is appending: then the chunk
    is not cached on disk rather than held while it waits (many readers would each hold one)."""
    import threading
    cache = ChunkCache(tmp_path, memory_bytes=0, pending_bytes=0)  # every put finds the writer behind
    try:
        first, second = b"a" * 1000, b"b" * 1000
        cache.put(sha256_digest(first), first)
        assert cache.location(sha256_digest(first)) is not None  # written by put itself
        appending, done = threading.Event(), threading.Event()

        def append():  # another thread holding the pack, as a long append does
            with cache._write_lock:
                appending.set()
                done.wait(10)

        t = threading.Thread(target=append)
        t.start()
        appending.wait(10)
        try:
            cache.put(sha256_digest(second), second)  # returns at once: it does not wait for the append
            assert cache.location(sha256_digest(second)) is None and cache.skipped == 1
        finally:
            done.set()
            t.join(10)
    finally:
        cache.close()


def big_chunk(root, **kw):
    """A cache holding one chunk of several blocks, on disk only (the memory tier keeps nothing)."""
    data = os.urandom(4 * BLOCK + 777)
    cache = ChunkCache(root, memory_bytes=0, **kw)
    cache.put(sha256_digest(data), data)
    assert cache.flush()
    return cache, data, sha256_digest(data)


def disk_reads(monkeypatch) -> list[int]:
    """The length of every read of a pack from now on."""
    lengths: list[int] = []
    real = Pack.read

    def read(self, offset, length):
        lengths.append(length)
        return real(self, offset, length)
    monkeypatch.setattr(Pack, "read", read)
    return lengths


def test_a_range_of_a_chunk_on_disk_reads_and_hashes_only_its_blocks(tmp_path, monkeypatch):
    cache, data, d = big_chunk(tmp_path)
    lengths = disk_reads(monkeypatch)
    assert cache.get(d, BLOCK + 10, BLOCK + 4106) == data[BLOCK + 10:BLOCK + 4106]
    assert cache.get(d, 2 * BLOCK - 5, 2 * BLOCK + 5) == data[2 * BLOCK - 5:2 * BLOCK + 5]
    assert cache.get(d, 4 * BLOCK + 700, 5 * BLOCK) == data[4 * BLOCK + 700:]  # the short last block
    assert cache.get(d, BLOCK - 1, 3 * BLOCK) == data[BLOCK - 1:3 * BLOCK]  # a program's pages, out of order
    assert lengths == [BLOCK, 2 * BLOCK, 777, 3 * BLOCK]
    assert cache.get(d, 0, 4096) == data[:4096]  # from its start: a reader going on into it reads it whole
    assert cache.get(d) == data and lengths[-2:] == [len(data)] * 2  # whole, it is hashed whole
    n = len(lengths)
    assert cache.get(d, BLOCK, BLOCK + 10, size=len(data) + 1) is None  # another length: not read at all
    assert cache.get(d, BLOCK, BLOCK + 10, size=len(data)) == data[BLOCK:BLOCK + 10] and len(lengths) == n + 1


def test_a_chunk_on_disk_before_the_start_is_read_whole_for_a_range(tmp_path, monkeypatch):
    _, data, d = big_chunk(tmp_path)
    fresh = ChunkCache(tmp_path, memory_bytes=0)  # its block digests went with the process that wrote it
    lengths = disk_reads(monkeypatch)
    assert fresh.get(d, BLOCK, BLOCK + 10) == data[BLOCK:BLOCK + 10]
    assert lengths == [len(data)]


@pytest.mark.parametrize("where", ["in the range", "elsewhere"])
def test_a_damaged_block_is_never_served(tmp_path, where):
    cache, data, d = big_chunk(tmp_path)
    pack, offset, _ = cache.location(d)
    raw = bytearray(pack.read_bytes())
    raw[offset + (BLOCK + 100 if where == "in the range" else 3 * BLOCK + 100)] ^= 0x01
    pack.write_bytes(bytes(raw))
    got = cache.get(d, BLOCK, BLOCK + 4096)
    if where == "in the range":
        assert got is None and cache.corrupt == 1 and not pack.exists() and not cache.contains(d)
    else:  # what is served was checked; the damage is caught where it is read
        assert got == data[BLOCK:BLOCK + 4096] and cache.corrupt == 0
        assert cache.get(d) is None and cache.corrupt == 1 and not pack.exists()
