"""Reads started ahead of a layer's build are handed over once, and only for the bytes it asks for."""

from __future__ import annotations

import threading

import pytest

from als.store.early import EarlyReads

BLOB = bytes(range(256)) * 40  # 10,240 bytes


@pytest.fixture
def early():
    e = EarlyReads()
    yield e
    e.close()


def read(start: int, end: int) -> bytes:
    return BLOB[start:end]


def test_a_read_is_taken_once_and_only_for_its_range(early):
    early.start(("img", "a"), 100, 200, read)
    early.start(("img", "b"), 100, 200, read)
    assert early.take(("img", "a"), 100, 200) == BLOB[100:200]
    assert early.take(("img", "a"), 100, 200) is None  # taken
    assert early.take(("img", "b"), 100, 201) is None  # other bytes: the build reads them itself
    assert early.pending() == []


def test_a_tail_read_is_taken_for_the_range_it_turned_out_to_be(early):
    early.start_tail(("img", "a"), 1000, lambda n: (len(BLOB) - n, BLOB[-n:]))
    assert early.tail_length(("img", "a")) == 1000
    assert early.take(("img", "a"), len(BLOB) - 1000, len(BLOB)) == BLOB[-1000:]
    early.start_tail(("img", "b"), 1000, lambda n: None)  # the registry would not say
    assert early.take(("img", "b"), len(BLOB) - 1000, len(BLOB)) is None


def test_a_failed_read_is_not_taken_and_a_second_start_does_not_replace_the_first(early):
    def fail(start, end):
        raise OSError("registry away")
    early.start(("img", "a"), 0, 10, fail)
    early.start(("img", "a"), 0, 10, read)  # once per key
    assert early.take(("img", "a"), 0, 10) is None


def test_reads_an_image_does_not_build_are_dropped(early):
    gate = threading.Event()

    def slow(start, end):
        gate.wait(10)
        return read(start, end)
    for digest in "abc":
        early.start(("img", digest), 0, 10, slow)
    early.start(("other", "a"), 0, 10, read)
    early.discard_image("img", {"b"})
    gate.set()
    assert sorted(early.pending()) == [("img", "b"), ("other", "a")]
    assert early.take(("img", "b"), 0, 10) == BLOB[:10]


def test_a_tail_guessed_after_the_layers_own_read_started_is_not_read(early):
    """The guess races the manifest: once the read ahead the manifest asked for has started (and even
    been taken by the build), a late guess would only read the tail a second time."""
    calls = []
    early.start(("img", "a"), 100, 200, read)
    assert early.take(("img", "a"), 100, 200) == BLOB[100:200]
    early.start_tail(("img", "a"), 1000, lambda n: calls.append(n) or (len(BLOB) - n, BLOB[-n:]))
    assert early.pending() == [] and calls == []
