"""What a container's miss brings along besides its own chunks, file by file.

The blob-order read-ahead (als/fetch/source.py) follows a reader's order
through the blob; these follow what is known of files: a program or library is
mapped and paged in out of order, so the rest of it comes with its first miss,
its end asked for apart and first; a small file in a directory is read with
its neighbours (an interpreter loading modules), so the small files after it
come too. Pure choices over chunks, for the fetcher to claim and fetch.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

from als.formats import toc as T

# How much of a program's or library's end is asked for apart from, and before, the rest
# (``split_end``): an ELF file's data segment, which starting it reads at once (python3.11's is 1.3 MB).
PROGRAM_END = 2 << 20
# The rest of the program is asked for once the answer for its end has begun, at most this many seconds
# later: a registry answers two requests in either order, and on a link that carries one answer after
# the other the end would otherwise come after the rest about half the time.
END_LEAD = 0.25

Claim = TypeVar("Claim", bound=tuple)  # (chunk, ...): what the fetcher holds for a chunk it fetches


def following(chunks: Sequence[T.Chunk], first: T.Chunk, budget: int) -> list[T.Chunk]:
    """``chunks`` (in blob order) from ``first`` on, within ``budget`` compressed bytes of it."""
    out = []
    for c in chunks:
        if c.blob_start < first.blob_start or c.zeros:
            continue
        if c.blob_end - first.blob_start > budget:
            break
        out.append(c)
    return out


def split_end(ahead: list[Claim], file_chunks: Sequence[T.Chunk], size: int = PROGRAM_END) -> list[Claim]:
    """Take out of ``ahead`` (claims for what a miss brings along, after it) those for the last
    ``size`` bytes of the program or library ``file_chunks`` make up, to be asked for apart and
    first; what is taken out, or nothing.

    Starting a program touches its end right after its first page: the kernel zeroes the rest of
    the data segment's last page, and the dynamic loader reads the dynamic section, both in the
    data segment that ends an ELF file. In one request they would come after all the code in
    between, and so would the libraries, which the loader and the prediction can name only once
    they have the dynamic section. Only with more of the file to bring before the end: otherwise
    one request serves as well.
    """
    if len(file_chunks) < 3:
        return []
    cut = file_chunks[-1].offset + file_chunks[-1].size - size
    end = {c for c in file_chunks if c.offset + c.size > cut}
    before = set(file_chunks) - end
    apart = [claim for claim in ahead if claim[0] in end]
    if not apart or not any(claim[0] in before for claim in ahead):
        return []
    ahead[:] = [claim for claim in ahead if claim[0] not in end]
    return apart
