"""Block digests of cached chunks: which bytes a range needs, and that a changed byte is caught."""

import os

import pytest

from als.fetch.blocks import BLOCK, WHOLE, BlockTables
from als.fetch.cache import sha256_digest


@pytest.fixture
def chunk():
    data = os.urandom(3 * BLOCK + 1000)  # three whole blocks and a short last one
    return data, sha256_digest(data)


def test_a_range_needs_only_the_blocks_it_lies_in(chunk):
    data, d = chunk
    tables = BlockTables()
    assert tables.span(d, 0, 10) is None  # nothing known of it yet: the caller reads it whole
    tables.add(d, data)
    assert tables.span(d, 0, 10) == (0, BLOCK)
    assert tables.span(d, BLOCK - 1, BLOCK + 1) == (0, 2 * BLOCK)
    assert tables.span(d, BLOCK, 2 * BLOCK) == (BLOCK, 2 * BLOCK)
    assert tables.span(d, 3 * BLOCK + 5, 10 * BLOCK) == (3 * BLOCK, 4 * BLOCK)  # the caller stops at the chunk's end
    assert tables.span(d, 5, 5) is None and tables.span(d, 5 * BLOCK, 6 * BLOCK) is None


def test_only_the_blocks_as_written_pass(chunk):
    data, d = chunk
    tables = BlockTables()
    tables.add(d, data)
    assert tables.check(d, BLOCK, data[BLOCK:3 * BLOCK])
    assert tables.check(d, 3 * BLOCK, data[3 * BLOCK:])  # the short last block
    flipped = bytearray(data[BLOCK:3 * BLOCK])
    flipped[BLOCK + 7] ^= 1
    assert not tables.check(d, BLOCK, bytes(flipped))
    assert not tables.check(d, BLOCK, data[BLOCK:2 * BLOCK - 1])  # cut short
    assert not tables.check(d, 0, data[BLOCK:2 * BLOCK])  # another block's bytes
    assert not tables.check(d, 5, data[5:BLOCK])  # not at a block boundary
    assert not tables.check(d, 3 * BLOCK, data[3 * BLOCK:] + b"\0")  # past the chunk's end
    assert not tables.check(sha256_digest(b"other"), 0, data[:BLOCK])  # no table: nothing passes


def test_a_chunk_of_two_blocks_gets_no_table_and_tables_stay_within_their_memory(chunk):
    data, d = chunk
    small = os.urandom(WHOLE)
    tables = BlockTables(memory=4 * 32)  # one table of this chunk's four blocks
    tables.add(sha256_digest(small), small)
    assert tables.span(sha256_digest(small), 0, 10) is None
    tables.add(d, data)
    other = os.urandom(WHOLE + 1)  # three blocks
    tables.add(sha256_digest(other), other)
    assert tables.span(d, 0, 10) is None  # the least recently used table went
    assert tables.span(sha256_digest(other), 0, 10) == (0, BLOCK)
    tables.drop([sha256_digest(other)])
    assert tables.span(sha256_digest(other), 0, 10) is None
