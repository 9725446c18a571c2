"""The chunk cache on a real directory: verification on read, atomic writes, a full disk."""

import hashlib

from als.cache import ChunkCache, sha256_digest


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
