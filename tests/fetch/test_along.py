"""What a miss brings along, file by file: pure choices over chunks."""

from __future__ import annotations

from als.fetch.along import following, split_end
from als.formats import toc as T

MIB = 1 << 20


def chunks(n: int, size: int = MIB) -> list[T.Chunk]:
    """A file of ``n`` chunks of ``size`` bytes, each compressed to half of it, back to back."""
    return [T.Chunk(i * size, size, i * size // 2, (i + 1) * size // 2, f"sha256:{i:064x}") for i in range(n)]


def test_following_takes_the_chunks_from_the_first_within_the_budget():
    file = chunks(6)
    assert following(file, file[2], 2 * MIB) == file[2:6]  # 4 chunks of 0.5 MiB compressed each
    assert following(file, file[2], MIB) == file[2:4]
    assert following(file, file[5], 0) == []


def test_a_programs_end_is_split_from_a_miss_at_its_start():
    file = chunks(7)  # python3.11: 6.8 MB, the data segment in the last 1.3 MB
    ahead = [(c, "claim") for c in file[1:]]
    apart = split_end(ahead, file, 2 * MIB)
    assert [c for c, _ in apart] == file[5:] and [c for c, _ in ahead] == file[1:5]


def test_nothing_is_split_that_one_request_serves_as_well():
    file = chunks(7)
    for ahead, size in (
        (file[1:], 0),  # no end asked for
        (file[6:], 2 * MIB),  # a miss in the end itself
        (file[5:], 2 * MIB),  # nothing of the file between the miss and the end
        (file[1:3], 2 * MIB),  # the read-ahead stops short of the end
    ):
        claims = [(c, "claim") for c in ahead]
        assert split_end(claims, file, size) == [] and [c for c, _ in claims] == ahead
    small = chunks(2)  # a file of two chunks: the second follows the first at once
    claims = [(small[1], "claim")]
    assert split_end(claims, small, MIB) == [] and len(claims) == 1
