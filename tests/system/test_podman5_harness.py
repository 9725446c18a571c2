"""The Podman 5 harness itself (tests/support/podman5.py): the apt mirror it builds from, the
chroot cache (built once, atomically, under a lock) and the namespace Podman 5 runs in.

    python3 -m pytest tests/system/test_podman5_harness.py -q
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import images, podman5


# --------------------------------------------------------------------------
# The mirror
# --------------------------------------------------------------------------

def test_debian_mirror_is_the_source_of_the_hosts_own_suite(tmp_path, monkeypatch):
    monkeypatch.delenv(podman5.MIRROR_ENV, raising=False)
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "a-security.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n")
    (apt / "sources.list.d" / "b-off.sources").write_text(
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n")
    (apt / "sources.list.d" / "c-vendor.list.disabled").write_text("deb http://vendor.example/ bookworm main\n")
    (apt / "sources.list.d" / "debian.sources").write_text(
        "# a comment\nTypes: deb deb-src\n# http://snapshot.example/archive\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://second.example/debian\nSuites: bookworm\n")
    assert podman5.debian_mirror(apt, "bookworm") == "http://mirror.example/debian"

    # the one-line format, in sources.list (read first, as apt does)
    (apt / "sources.list").write_text("deb [signed-by=/k.gpg arch=amd64] http://one.example/debian bookworm main\n")
    assert podman5.debian_mirror(apt, "bookworm") == "http://one.example/debian"

    with pytest.raises(RuntimeError, match=podman5.MIRROR_ENV):
        podman5.debian_mirror(apt, "trixie")
    monkeypatch.setenv(podman5.MIRROR_ENV, "http://override.example/debian")
    assert podman5.debian_mirror(apt, "trixie") == "http://override.example/debian"


def test_debian_mirror_of_this_machine():
    assert podman5.debian_mirror().startswith(("http://", "https://"))


# --------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------

def fake_tree(target: Path, version: str = "5.4.2+ds1-2") -> None:
    (target / "usr/bin").mkdir(parents=True)
    (target / "usr/bin/podman").write_text("")
    (target / "var/lib/dpkg").mkdir(parents=True)
    (target / "var/lib/dpkg/status").write_text(
        "Package: runc\nStatus: install ok installed\nVersion: 1.1\n\n"
        f"Package: podman\nStatus: install ok installed\nVersion: {version}\n")


def test_chroot_is_built_once_atomically_and_rebuilt_for_other_packages(tmp_path):
    cache = tmp_path / "cache"
    calls = []

    def build(suite, target, packages, mirror, timeout, log_path):
        calls.append((suite, tuple(packages), mirror))
        time.sleep(0.5)  # the other callers meanwhile wait on the lock
        fake_tree(target)

    # what a build killed half way leaves behind
    (cache / ".build-trixie-99999" / "usr/bin").mkdir(parents=True)
    (cache / ".build-trixie-99999" / "usr/bin/podman").write_text("")

    def ensure(_):
        return podman5.ensure_chroot("trixie", cache_dir=cache, packages=("podman",), mirror="http://m", build=build)

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ensure, range(4)))
    assert calls == [("trixie", ("podman",), "http://m")]
    assert sorted(c.built_now for c in got) == [False, False, False, True]
    assert {c.path for c in got} == {cache / "trixie"}
    assert got[0].podman_version == "5.4.2+ds1-2" and got[0].podman_release == (5, 4)
    assert sorted(p.name for p in cache.iterdir()) == [".trixie.lock", "trixie"]  # the killed build's gone

    # found in the cache next time, without building
    again = ensure(0)
    assert not again.built_now and len(calls) == 1

    # a build that fails is never taken as done, and leaves nothing
    def broken(suite, target, packages, mirror, timeout, log_path):
        fake_tree(target)  # complete-looking, but no stamp: the build did not finish
        raise RuntimeError("the mirror went away")

    with pytest.raises(RuntimeError, match="went away"):
        podman5.ensure_chroot("sid", cache_dir=cache, packages=("podman",), mirror="http://m", build=broken)
    assert not (cache / "sid").exists() and not list(cache.glob(".build-sid-*"))

    # another package list: rebuilt, replacing the old tree
    other = podman5.ensure_chroot("trixie", cache_dir=cache, packages=("podman", "runc"), mirror="http://m",
                                  build=build)
    assert other.built_now and len(calls) == 2
    assert not list(cache.glob(".old-*")) and not list(cache.glob(".build-trixie-*"))
    assert not podman5.ensure_chroot("trixie", cache_dir=cache, packages=("runc", "podman"), mirror="http://m",
                                     build=build).built_now


# --------------------------------------------------------------------------
# The namespace (real Podman 5.4)
# --------------------------------------------------------------------------

def _mounts_of(*paths: Path) -> list[str]:
    """Host mounts that name any of ``paths`` (other tests mount and unmount meanwhile)."""
    with open("/proc/mounts") as f:
        return [line for line in f.read().splitlines() if any(str(p) in line for p in paths)]


@pytest.mark.slow
def test_podman5_runs_in_a_namespace_that_leaves_no_trace(tmp_path):
    chroot = podman5.ensure_chroot("trixie")
    etc_before = sorted(os.listdir(chroot.path / "etc"))
    tar = tmp_path / "busybox.tar"
    tar.write_bytes(images.busybox_layer())
    p = podman5.Podman5(chroot, tmp_path / "p", binds=[podman5.Bind(tar, read_only=True)])  # a file
    try:
        assert p.version().startswith("5.4.")
        info = p.namespace.run(["sh", "-c", "echo probe > /etc/als-probe && cat /proc/self/mountinfo"]).stdout
        assert " / / " in info.splitlines()[0] and "overlay" in info.splitlines()[0]  # / is a mount point
        assert not (chroot.path / "etc/als-probe").exists()  # the cache is never written

        p.import_tar(tar, "localhost/bb:1")
        p.run("run", "-d", "--name", "sleeper", "localhost/bb:1", "sleep", "1000")
        assert p.run("exec", "sleeper", "sh", "-c", "ulimit -n").stdout.strip() == "1024"
        inside = p.namespace.pids()
        assert len(inside) >= 3  # init, conmon, the container's sleep
        assert any(Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x001000\x00" for pid in inside)
        assert _mounts_of(tmp_path, chroot.path) == []  # every mount lives in the namespace
    finally:
        p.close()
    assert [pid for pid in inside if podman5.process_tree(pid)] == []  # all gone
    assert _mounts_of(tmp_path, chroot.path) == []
    assert sorted(os.listdir(chroot.path / "etc")) == etc_before
    assert not any((tmp_path / "p").iterdir())
