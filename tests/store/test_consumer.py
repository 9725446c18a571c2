"""Telling which containers/storage asks the store, from the caller's executable.

Real Go programs of this machine: Debian's Podman 4.3.1 (built without module
versions, containers/storage 1.43), docker-registry and containerd (Go, no
containers/storage), and, from the chroots the Podman 5 tier uses (built
once if missing), Debian trixie's Podman 5.4 (containers/storage 1.57: not
affected) and sid's 5.8 (containers/storage 1.64: affected).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from als.store import consumer as C
from als.ops import status
from als.config import load_config
from als.ops.daemon import build_store
from tests.support import podman5

PODMAN4 = "/usr/bin/podman"


def test_debian_podman_4_3_is_recognised_and_not_affected():
    c = C.inspect(PODMAN4)
    assert c is not None and c.module == "github.com/containers/storage" and c.version == ""
    assert not c.affected and "older than containers/storage 1.58" in c.evidence


@pytest.mark.parametrize("program", ["/usr/bin/docker-registry", "/usr/bin/containerd", "/usr/bin/python3"])
def test_programs_without_containers_storage_are_no_consumers(program):
    if not os.path.exists(program):
        pytest.skip(f"{program} is not installed")
    assert C.inspect(program) is None


@pytest.mark.parametrize("suite", sorted(podman5.SUITES))
def test_debian_podman_5_binaries(suite):
    """Podman 5.5 and later (containers/storage >= 1.58) are affected; 5.4 is not. Always checked: a
    machine without the chroots builds them, as the Podman 5 tier does, rather than skip."""
    chroot = podman5.ensure_chroot(suite)
    major, minor = chroot.podman_release
    c = C.inspect(str(chroot.path / "usr" / "bin" / "podman"))
    assert c is not None
    assert c.affected == ((major, minor) >= (5, 5)), (chroot.podman_version, c)
    assert c.module == ("go.podman.io/storage" if (major, minor) >= (5, 7) else "github.com/containers/storage")


def test_build_info_of_a_module_build_is_read():
    """An upstream Go build (gcloud's kubectl here) records its dependencies; none is containers/storage."""
    kubectl = "/usr/lib/google-cloud-sdk/bin/kubectl"
    if not os.path.exists(kubectl):
        pytest.skip("no Go program built in module mode on this machine")
    with open(kubectl, "rb") as f:
        data = f.read()
    start = data.index(b"\xff Go buildinf:")
    info = C.modinfo(data[start:start + 64 << 10])
    assert info.startswith("path\t") and "\ndep\tk8s.io/" in info
    assert C.storage_dependency(info) == ("", "")
    assert C.inspect(kubectl) is None


@pytest.mark.parametrize("lines, module, version, affected", [
    (["dep\tgithub.com/containers/storage\tv1.57.2\th1:x="], "github.com/containers/storage", "v1.57.2", False),
    (["dep\tgithub.com/containers/storage\tv1.58.0\th1:x="], "github.com/containers/storage", "v1.58.0", True),
    (["dep\tgithub.com/containers/storage\tv1.58.1-0.20250320123456-0123456789ab\th1:x="],
     "github.com/containers/storage", "v1.58.1-0.20250320123456-0123456789ab", True),
    (["dep\tgo.podman.io/storage\tv1.61.0\th1:x="], "go.podman.io/storage", "v1.61.0", True),
    # replaced by another version: that one counts; by a local directory: unknown
    (["dep\tgithub.com/containers/storage\tv1.58.0\th1:x=", "=>\tgithub.com/containers/storage\tv1.57.1\th1:y="],
     "github.com/containers/storage", "v1.57.1", False),
    (["dep\tgithub.com/containers/storage\tv1.58.0\th1:x=", "=>\t../storage\t\t"],
     "github.com/containers/storage", "", False),
    (["dep\tgithub.com/other/storage\tv9.0.0\th1:x=", "=>\tgithub.com/containers/storage\tv1.58.0\th1:y="],
     "", "", False),
])
def test_storage_dependency_from_build_info(lines, module, version, affected):
    info = "\n".join(["path\tgithub.com/containers/podman/v5/cmd/podman", "mod\tgithub.com/containers/podman/v5\t(devel)\t",
                      "dep\tgithub.com/BurntSushi/toml\tv1.5.0\th1:z=", *lines, "build\t-compiler=gc"])
    assert C.storage_dependency(info) == (module, version)
    assert C.version_affected(module, version) == affected


def affected_copy(tmp_path: Path) -> Path:
    """Debian's Podman 4.3.1 with one function name turned into the one containers/storage 1.58 added.

    A real ELF Go program that the function-table check must call affected; the
    real affected Podman (5.8) is in a chroot that this machine may not have.
    """
    data = Path(PODMAN4).read_bytes()
    old = b"storage.(*layerStore).layersByDigestMap"
    assert len(old) == len(C.LOST_LOCATION_FUNCTION) and old in data
    path = tmp_path / "podman"
    path.write_bytes(data.replace(old, C.LOST_LOCATION_FUNCTION))
    return path


def test_consumers_inspect_each_program_once_and_warn_once(tmp_path, caplog):
    proc = tmp_path / "proc"
    bad = affected_copy(tmp_path)
    for pid, target in ((100, bad), (101, bad), (102, Path(PODMAN4)), (103, Path("/usr/bin/python3"))):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "exe").symlink_to(target)
    consumers = C.Consumers(proc=str(proc))
    try:
        with caplog.at_level(logging.INFO, logger="als.consumer"):
            for pid in (100, 101, 100, 102, 103, 999):  # 999: gone
                consumers.seen(pid)
            consumers.wait()
        assert [c.program for c in consumers.affected()] == [str(bad)]
        assert sorted(c.program for c in consumers.all()) == sorted([str(bad), PODMAN4])
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # one executable, one warning, however many processes asked
        assert str(bad) in warnings[0] and "layer not known" in warnings[0] and "contrib/upstream/" in warnings[0]

        # `als status` shows it, from a real store.
        store = build_store(tmp_path / "root", load_config(None))
        store.consumers.close()
        store.consumers = consumers
        try:
            st = status.collect(store)
            assert [e["program"] for e in st["engines"] if e["affected"]] == [str(bad)]
            assert f"WARNING: {bad} (containers/storage 1.58 or later) loses layers" in status.render(st)
        finally:
            store.close()
    finally:
        consumers.close()


def test_a_changed_program_is_inspected_again(tmp_path):
    """The cache is keyed by the executable's identity, so an upgraded binary is looked at anew."""
    proc = tmp_path / "proc"
    (proc / "7").mkdir(parents=True)
    program = tmp_path / "podman"
    shutil.copyfile(PODMAN4, program)
    (proc / "7" / "exe").symlink_to(program)
    consumers = C.Consumers(proc=str(proc))
    try:
        consumers.seen(7)
        consumers.wait()
        assert not consumers.affected()
        program.unlink()
        (tmp_path / "new").mkdir()
        shutil.copyfile(affected_copy(tmp_path / "new"), program)
        consumers.seen(7)
        consumers.wait()
        assert [c.program for c in consumers.affected()] == [str(program)]
    finally:
        consumers.close()
