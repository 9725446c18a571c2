"""Parsing mountinfo and finding the mounts that rest on a root file system (no mounts needed)."""

from __future__ import annotations

from als.rootfs import mountinfo
from als.rootfs.overlay import fd_lowerdir_option

# Podman 4.3.1's `--rootfs DIR:O` overlay (from this machine), our own overlay made with lowerdir+,
# a bind of it elsewhere, a copy of it in another namespace at the same place, and unrelated mounts.
TEXT = "\n".join([
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw",
    r"300 22 0:57 / /run/als/my\040app rw,relatime shared:200 - overlay overlay ro,lowerdir+=/s/A/sha256:1/diff,"
    r"lowerdir+=/s/A/sha256:2/diff,redirect_dir=on",
    r"301 22 0:60 / /var/run/c/merged rw,nodev,relatime - overlay overlay rw,lowerdir=/run/als/my\040app,"
    r"upperdir=/var/run/c/upper,workdir=/var/run/c/work,uuid=on",
    r"302 22 0:57 /tree /mnt/elsewhere ro,relatime - overlay overlay ro,lowerdir+=/s/A/sha256:1/diff",
    r"303 22 0:61 / /var/run/d/merged rw - overlay overlay rw,lowerdir=/other:/run/als/not-it,upperdir=/u",
    "garbage line",
])
TARGET = "/run/als/my app"


def test_parse_unescapes_and_skips_bad_lines():
    mounts = mountinfo.parse(TEXT)
    assert [m.mount_id for m in mounts] == [22, 300, 301, 302, 303]
    assert mounts[1].mount_point == TARGET and mounts[1].device == "0:57" and mounts[3].root == "/tree"
    assert mounts[2].fstype == "overlay" and mounts[2].source == "overlay"


def test_lower_dirs_of_both_spellings():
    assert mountinfo.lower_dirs(r"ro,lowerdir+=/a/sha256:1/diff,lowerdir+=/b,redirect_dir=on") == \
        ["/a/sha256:1/diff", "/b"]
    # mount(2)'s string: ':' separates, '\:' is a colon in a name (shown by the kernel as \134:)
    assert mountinfo.lower_dirs(r"rw,lowerdir=/x/sha256\134:1/diff:/y::/data,upperdir=/u") == \
        ["/x/sha256:1/diff", "/y", "/data"]
    assert mountinfo.lower_dirs(r"rw,lowerdir=/with\054comma:/z,datadir+=/d") == ["/with,comma", "/z", "/d"]
    assert mountinfo.lower_dirs("rw,upperdir=/u") == []


def test_users_are_overlays_on_it_and_binds_elsewhere_not_copies_at_the_same_place():
    found = mountinfo.users_in(mountinfo.parse(TEXT), TARGET, (0, 57), pid=7)
    assert [(u.mount_point, u.how) for u in found] == [("/var/run/c/merged", "overlay lower directory"),
                                                        ("/mnt/elsewhere", "bind mount")]
    assert "mount namespace of pid 7" in found[0].describe()
    # A lower directory of that name that is not our mount in that namespace does not count.
    assert mountinfo.users_in(mountinfo.parse(TEXT), TARGET, (0, 57), confirm=lambda p: False)[0].how == "bind mount"
    assert mountinfo.users_in(mountinfo.parse(TEXT), "/run/als/other", (0, 99)) == []


def test_fallback_lowerdir_option_is_short():
    assert fd_lowerdir_option([3, 4], False) == "lowerdir=/proc/self/fd/3:/proc/self/fd/4"
    assert fd_lowerdir_option([3, 4], True).endswith(",userxattr")
    assert len(fd_lowerdir_option(list(range(100, 300)), False)) < 4096  # 200 layers fit a page
