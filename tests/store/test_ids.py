"""The id table keeps handing out saved ids when the disk is full, and never leaves a torn record behind."""

from __future__ import annotations

import contextlib
import subprocess

import pytest

from als.store.ids import RESERVE, IdTable
from tests.support.store_process import is_mounted


@contextlib.contextmanager
def small_tmpfs(path):
    """A 256 KiB tmpfs at ``path``, and a list where the test puts the tables to close before it goes."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(path)], check=True, timeout=30)
    tables: list[IdTable] = []
    try:
        yield path, tables
    finally:
        for t in tables:
            with contextlib.suppress(OSError):
                t.close()
        if subprocess.run(["umount", str(path)], timeout=30).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], timeout=30)
        assert not is_mounted(path)


def fill(path):
    with open(path / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(4096))


@pytest.mark.real  # mounts a tmpfs (root)
def test_a_full_disk_still_gets_saved_ids_from_the_reserve(tmp_path):
    with small_tmpfs(tmp_path / "t") as (root, tables):
        table = IdTable(root / "ids")
        tables.append(table)
        first = table.image("registry.example/app:1")
        fill(root)
        layers = [table.layer("registry.example/app:1", f"sha256:{i:064x}") for i in range(100)]
        assert len(set(layers)) == 100 and first not in layers
        again = IdTable(root / "ids")  # a successor reads every id handed out while the disk was full
        tables.append(again)
        assert again.find("image", "registry.example/app:1") == first
        assert [again.find("layer", "registry.example/app:1", f"sha256:{i:064x}") for i in range(100)] == layers


@pytest.mark.real  # mounts a tmpfs (root)
def test_with_the_reserve_gone_a_new_id_is_refused_and_the_table_stays_whole(tmp_path):
    with small_tmpfs(tmp_path / "t") as (root, tables):
        table = IdTable(root / "ids")
        tables.append(table)
        fill(root)
        handed = []
        with pytest.raises(OSError, match="could not save the id"):
            for i in range(RESERVE):  # far more records than the reserve holds
                handed.append(table.layer("r", f"sha256:{i:064x}"))
        assert len(handed) > RESERVE // 200  # the reserve served a few hundred first
        (root / "filler").unlink()
        later = table.layer("r", "after")  # after a failed write: appended after whole records only
        again = IdTable(root / "ids")
        tables.append(again)
        assert [again.find("layer", "r", f"sha256:{i:064x}") for i in range(len(handed))] == handed
        assert again.find("layer", "r", "after") == later
