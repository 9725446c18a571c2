"""Access profiles: the files a workload reads, in the order it first reads them.

`als optimize` records one and `als convert --prioritize` consumes one: a text
file with one layer path per line (as in the tar, no leading "/"); blank lines
and lines starting with "#" are ignored. Paths holding a newline cannot be
written in this form and are left out of a recorded profile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from als.errors import ALSError


def read_profile(path: str | Path) -> list[str]:
    """The paths of a profile file, in order, without duplicates."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise ALSError(f"cannot read the profile {path}: {e.strerror or e}") from None
    out: dict[str, None] = {}
    for line in text.splitlines():
        name = line.strip().lstrip("/")
        if name and not line.lstrip().startswith("#"):
            out.setdefault(name, None)
    return list(out)


def write_profile(path: str | Path, paths: Iterable[str], comment: str = "") -> int:
    """Write ``paths`` as a profile file; returns how many were written."""
    lines = [f"# {line}" for line in comment.splitlines()]
    n = 0
    for p in paths:
        if "\n" in p or "\r" in p:
            continue
        lines.append(p.lstrip("/"))
        n += 1
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
    return n
