"""The prefetch order both writers share: the prioritised files first, still extractable.

A store that prefetches the front of a layer gets the files a container
reads first if a writer puts them there; each moves with its parent
directories and, for a hard link, its target, so the reordered stream still
extracts. Reordering needs the whole stream, so payloads are spooled.
"""

from __future__ import annotations

import posixpath
import tarfile
import tempfile
from typing import Iterable, Sequence

from als.formats.estargz import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME
from als.formats.tocentries import COPY_PIECE


def _lenient_clean(name: str) -> str:
    return posixpath.normpath("/" + name).lstrip("/")


def prefetch_order(
    names: Sequence[str], hardlinks: Sequence[str], prioritized: Iterable[str]
) -> tuple[list[int], int]:
    """Order entries for a prefetch layer: prioritized first, then the rest.

    ``names[i]`` is entry i's tar name and ``hardlinks[i]`` its hard-link target
    ("" if none). Returns the new order (indices) and how many leading entries
    are prioritized, i.e. where ``.prefetch.landmark`` goes. Each prioritized
    name is preceded by its parent directories, and a hard link by its target,
    so the reordered stream still extracts; names not in the input are ignored.
    """
    by_name: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        by_name.setdefault(_lenient_clean(name), []).append(i)
    moved: list[int] = []
    taken: set[int] = set()

    def move(name: str, depth: int = 0) -> None:
        if depth > 40:  # a hard-link cycle can only come from a broken tar
            return
        parts = name.split("/") if name else []
        for k in range(len(parts)):  # "" (root), then each parent, top-down
            for i in by_name.get("/".join(parts[:k]), ()):
                if i not in taken:
                    taken.add(i)
                    moved.append(i)
        for i in by_name.get(name, ()):
            if i not in taken:
                taken.add(i)
                if hardlinks[i]:
                    move(_lenient_clean(hardlinks[i]), depth + 1)
                moved.append(i)

    for wanted in prioritized:
        name = _lenient_clean(wanted)
        if name in by_name:
            move(name)
    rest = [i for i in range(len(names)) if i not in taken]
    return moved + rest, len(moved)


def skipped(info: tarfile.TarInfo) -> bool:
    """Entries we write ourselves, so copies from a previous conversion go."""
    return _lenient_clean(info.name) in (TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK)


def reordered_members(tf: tarfile.TarFile, prioritized: Sequence[str]):
    """Yield ``(info, payload or None, prioritized?)`` with the prioritized entries first.

    Reordering needs the whole stream, so payloads are spooled to a temporary
    file (memory stays bounded) and each is handed out positioned at its
    start. Shared by the eStargz and zstd:chunked writers.
    """
    with tempfile.SpooledTemporaryFile(max_size=16 << 20) as spool:
        members: list[tuple[tarfile.TarInfo, int]] = []  # (header, payload offset in spool)
        for info in tf:
            if skipped(info):
                continue
            start = spool.tell()
            if info.isreg():
                source = tf.extractfile(info)
                while piece := source.read(COPY_PIECE):
                    spool.write(piece)
            members.append((info, start))
        names = [info.name for info, _ in members]
        links = [info.linkname if info.islnk() else "" for info, _ in members]
        order, n_first = prefetch_order(names, links, prioritized)
        for position, i in enumerate(order):
            info, start = members[i]
            spool.seek(start)
            yield info, (spool if info.isreg() else None), position < n_first


