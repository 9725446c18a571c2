"""The chunk cache on a real directory: verification on read, atomic writes, a full disk."""

import hashlib

from als.fetch.cache import ChunkCache, sha256_digest


def test_put_get_and_survives_a_new_instance(tmp_path):
    data = b"hello chunk" * 1000
    d = sha256_digest(data)
    first = ChunkCache(tmp_path)
    first.put(d, data)
    assert first.flush()
    fresh = ChunkCache(tmp_path, memory_bytes=0)
    assert fresh.get(d) == data
    assert fresh.get(sha256_digest(b"other")) is None


def test_corrupt_entry_is_dropped_not_served(tmp_path):
    data = b"x" * 5000
    d = sha256_digest(data)
    c = ChunkCache(tmp_path, memory_bytes=0)
    c.put(d, data)
    assert c.flush()
    c.path(d).write_bytes(b"y" * 5000)  # a bit flip, a torn write or a planted file
    assert c.get(d) is None and not c.path(d).exists() and c.corrupt == 1


def test_crash_leftovers_are_removed_at_start(tmp_path):
    ChunkCache(tmp_path)
    leftover = tmp_path / "chunks" / "tmp" / "abc.123"
    leftover.write_bytes(b"half")
    ChunkCache(tmp_path)
    assert not leftover.exists()


def test_unwritable_disk_keeps_serving_from_memory(tmp_path):
    c = ChunkCache(tmp_path)
    (tmp_path / "chunks" / "tmp").rmdir()
    (tmp_path / "chunks" / "tmp").write_text("not a directory")  # every write now fails
    data = b"z" * 100
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    c.put(d, data)
    assert c.flush()
    assert c.get(d) == data and not c.path(d).exists()


def test_a_full_disk_evicts_least_recently_used_and_stores_the_new_chunk(tmp_path):
    import subprocess
    import os
    from tests.support.store_process import is_mounted
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(root)], check=True, timeout=30)
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
        assert cache.path(digests[8]).read_bytes() == blobs[8]  # stored, after making room
        assert not cache.contains(digests[0])  # the least recently used went first
        assert cache.stats().evicted >= 1
        for p in (root / "chunks" / "sha256").rglob("*"):
            if p.is_file():
                assert sha256_digest(p.read_bytes()) == "sha256:" + p.name
    finally:
        subprocess.run(["umount", str(root)], timeout=30)
        assert not is_mounted(root)
