"""BlobSource's read-ahead window: how fast a front-to-back reader is recognised."""

from __future__ import annotations

from als.digest import sha256_digest
from als.fetch.source import BlobSource
from als.formats import toc as T

CHUNK = 64 << 10


def blob(n: int) -> BlobSource:
    chunks = [T.Chunk(0, CHUNK, i * CHUNK, (i + 1) * CHUNK, sha256_digest(i.to_bytes(4, "big"))) for i in range(n)]
    return BlobSource("test blob", lambda start, end: b"", chunks=chunks)


def walk(source: BlobSource, misses: int, minimum: int, maximum: int) -> list[tuple[int, bool]]:
    """Bytes read ahead, and whether the source then says it streams, after each of ``misses``
    misses, each where the last read-ahead ended."""
    out, at = [], 0
    for _ in range(misses):
        ahead = source.after(source.chunks[at], source.chunks[at], minimum, maximum)
        out.append((sum(c.blob_end - c.blob_start for c in ahead), source.streaming))
        at += 1 + len(ahead)
    return out


def test_the_window_quadruples_on_sequential_misses_and_a_tree_walk_streams_by_the_fourth():
    assert walk(blob(1024), 5, 4 * CHUNK, 64 * CHUNK) == [
        (0, False), (4 * CHUNK, False), (16 * CHUNK, False), (64 * CHUNK, True), (64 * CHUNK, True)]


def test_a_jump_collapses_the_window():
    source = blob(1024)
    assert walk(source, 4, 4 * CHUNK, 64 * CHUNK)[-1] == (64 * CHUNK, True)
    assert source.after(source.chunks[900], source.chunks[900], 4 * CHUNK, 64 * CHUNK) == []
    assert not source.streaming


def test_a_reader_catching_up_with_the_background_fetch_still_streams():
    """Past the read-ahead, the background fetch brought chunks in; the reader misses where it
    stopped: that is where a front-to-back reader goes next, not a jump."""
    source = blob(1024)
    assert walk(source, 4, 4 * CHUNK, 64 * CHUNK)[-1] == (64 * CHUNK, True)
    at = 1 + 1 + 4 + 16 + 64  # where the last read-ahead ended
    filled = {c.digest for c in source.chunks[at:at + 40]}  # what the background fetch brought since
    frontier = source.chunks[at + 40]
    assert source.after(frontier, frontier, 4 * CHUNK, 64 * CHUNK, lambda c: c.digest in filled)
    assert source.streaming
    hole = source.chunks[at + 200]  # past chunks nobody fetched: a jump
    assert source.after(hole, hole, 4 * CHUNK, 64 * CHUNK, lambda c: c.digest in filled) == []
    assert not source.streaming
