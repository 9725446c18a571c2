"""Deterministic, UNCOMPRESSED layer tars for tests, demo and bench.

* ``python_rootfs_tar()``: a small real root file system (Debian's python3.11,
  its shared libraries, the stdlib, a static busybox) that runs
  ``python3 -c 'print(1)'`` and ``sh -c ...``; cached on disk.
* ``busybox_layer()`` + ``tree_layers()`` (= ``tree_image_layers()``): a runnable
  multi-layer image whose ``/tree`` exercises every tar entry type, whiteouts and
  an opaque directory; ``expected_tree()`` is the merged view those layers must
  produce, ``tree_listing_command()`` prints that view from inside a container
  and ``parse_tree_listing()`` reads it back in the same normalized form.

Everything here is a pure function of its inputs: fixed mtimes, uid/gid set
explicitly, no user/group names, entries in a fixed order, PAX format (tarfile
writes PAX headers only where needed: long or non-ASCII names, xattrs), so the
bytes and therefore the digests are stable across runs.

Compressing and pushing these layers is another module's job.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable

DEFAULT_CACHE_DIR = Path("/var/tmp/als-test-cache")
EPOCH = 1_700_000_000  # 2023-11-14T22:13:20Z: the mtime of every synthetic entry unless stated

BUSYBOX = "/bin/busybox"  # Debian's busybox-static (apt-get install -y busybox-static)
PYTHON = "/usr/bin/python3.11"

# Applets linked to busybox in every image here. tree_listing_command() needs
# sh, find, sort, stat, readlink, sha256sum.
BUSYBOX_APPLETS = (
    "sh", "ls", "cat", "find", "stat", "tar", "wc", "sha256sum", "readlink", "sort",
    "head", "tail", "dd", "cut", "tr", "grep", "sed", "echo", "env", "sleep", "true",
    "false", "id", "du", "mkdir", "rm", "cp", "mv", "ln", "touch", "md5sum", "xargs",
    "od", "cmp", "test", "[", "uname", "mount", "df", "chmod", "chown", "printf",
)


# --------------------------------------------------------------------------
# Entry model and tar writer
# --------------------------------------------------------------------------

FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO = "f", "d", "l", "h", "c", "b", "p"

_TAR_TYPES = {FILE: tarfile.REGTYPE, DIR: tarfile.DIRTYPE, SYMLINK: tarfile.SYMTYPE,
              HARDLINK: tarfile.LNKTYPE, CHAR: tarfile.CHRTYPE, BLOCK: tarfile.BLKTYPE,
              FIFO: tarfile.FIFOTYPE}


@dataclass(frozen=True)
class Entry:
    """One tar entry. ``path`` is relative ("tree/a"), no leading "./" or "/".

    ``link``: symlink target, or for HARDLINK the path of the entry it links to.
    ``xattrs``: written as PAX ``SCHILY.xattr.<name>`` records.
    """
    path: str
    type: str = FILE
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = EPOCH
    data: bytes = b""
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


def write_tar(entries: Iterable[Entry], out) -> None:
    """Write ``entries`` in order as a PAX tar to the binary file object ``out``."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.path + ("/" if e.type == DIR else ""))
            ti.type = _TAR_TYPES[e.type]
            ti.mode = e.mode
            ti.uid, ti.gid = e.uid, e.gid
            ti.uname = ti.gname = ""
            ti.mtime = int(e.mtime)
            if e.type in (SYMLINK, HARDLINK):
                ti.linkname = e.link
            if e.type in (CHAR, BLOCK):
                ti.devmajor, ti.devminor = e.dev
            if e.xattrs:
                # bytes -> str via surrogateescape: tarfile then marks non-UTF-8 values BINARY
                ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                                  for k, v in sorted(e.xattrs.items())}
            if e.type == FILE:
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)


def hardlink(path: str, target: Entry) -> Entry:
    """A hard link entry to ``target`` carrying the target's metadata, as tar
    writers do. (c/storage applies a link header's mode/owner/mtime to the
    shared inode, so a link header with other values changes the target too.)"""
    return Entry(path, HARDLINK, target.mode, target.uid, target.gid, target.mtime, link=target.path)


def layer_tar(entries: Iterable[Entry]) -> bytes:
    """The uncompressed tar bytes of ``entries``."""
    buf = io.BytesIO()
    write_tar(entries, buf)
    return buf.getvalue()


# --------------------------------------------------------------------------
# busybox layer
# --------------------------------------------------------------------------

def busybox_entries(busybox: str = BUSYBOX, bindir: str = "bin") -> list[Entry]:
    """``bin/busybox`` (static) + ``bin/<applet> -> busybox`` symlinks."""
    data = Path(busybox).read_bytes()
    out = [Entry(bindir, DIR, 0o755), Entry(f"{bindir}/busybox", FILE, 0o755, data=data)]
    out += [Entry(f"{bindir}/{a}", SYMLINK, 0o777, link="busybox") for a in BUSYBOX_APPLETS]
    return out


def busybox_layer(busybox: str = BUSYBOX) -> bytes:
    """A one-layer root file system with only a static busybox in /bin (plus /tmp)."""
    if not os.path.exists(busybox):
        raise FileNotFoundError(f"{busybox} missing: apt-get install -y busybox-static")
    return layer_tar(busybox_entries(busybox) + [Entry("tmp", DIR, 0o1777)])


# --------------------------------------------------------------------------
# The tree image: layers exercising every entry type, whiteouts, opaque dirs
# --------------------------------------------------------------------------

TREE_ROOT = "tree"
CHUNK = 1 << 20  # the 1 MiB chunk size big.bin is meant to span


def _pseudo_random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# A directory chain making a path longer than 100 bytes (ustar's name field),
# ending in a name longer than 100 bytes by itself: needs PAX "path".
LONG_DIR = f"{TREE_ROOT}/long/" + "/".join(["d" * 30, "e" * 30, "f" * 30])
LONG_FILE = LONG_DIR + "/" + "n" * 120
UNICODE_NAME = f"{TREE_ROOT}/name with spaces ünïcødé ✓.txt"


def tree_layer_entries() -> list[list[Entry]]:
    """The entries of the tree layers (without the busybox base), in tar order.

    Every layer repeats the directory entries it writes into (``tree/`` etc.)
    with its own mtime, so the merged view's directory attributes are fully
    determined by the layers (no directory gets "now" as mtime).
    """
    t = EPOCH
    T = TREE_ROOT
    # ---- layer 1: every entry type ------------------------------------------------
    l1 = [
        Entry(T, DIR, 0o755, mtime=t + 1),                      # the root of the listing
        Entry(f"{T}/dir", DIR, 0o750, 1000, 1000, t + 2),        # plain dir, non-root owner, 0750
        Entry(f"{T}/dir/inner.txt", FILE, 0o640, 1000, 1000, t + 3, b"inner\n"),
        Entry(f"{T}/dir/link_up", SYMLINK, 0o777, 1000, 1000, t + 4, link="../small.txt"),  # relative with ..
        Entry(f"{T}/setgid_dir", DIR, 0o2755, 0, 1000, t + 5),  # setgid directory
        Entry(f"{T}/sticky_dir", DIR, 0o1777, 0, 0, t + 6),      # sticky, world-writable (like /tmp)
        Entry(f"{T}/empty", FILE, 0o644, 0, 0, t + 7, b""),      # empty regular file (no chunks)
        Entry(f"{T}/small.txt", FILE, 0o644, 1000, 1000, t + 8, b"hello, tree\n"),  # small, owned 1000
        Entry(f"{T}/big.bin", FILE, 0o644, 0, 0, t + 9,         # 3 MiB + 17 bytes: spans 4 chunks of 1 MiB
              _pseudo_random(3 * CHUNK + 17, seed=1)),
        setuid := Entry(f"{T}/setuid", FILE, 0o4755, 0, 0, t + 10,  # setuid executable (+ a hard link below)
                        b"#!/bin/sh\necho setuid\n"),
        Entry(f"{T}/setgid_file", FILE, 0o2755, 0, 1000, t + 11, b"#!/bin/sh\necho setgid\n"),
        Entry(f"{T}/readonly", FILE, 0o400, 0, 0, t + 12, b"read only\n"),  # mode without any w/x bit
        Entry(f"{T}/link_rel", SYMLINK, 0o777, 0, 0, t + 13, link="small.txt"),            # relative symlink
        Entry(f"{T}/link_abs", SYMLINK, 0o777, 0, 0, t + 14, link="/tree/small.txt"),      # absolute symlink
        Entry(f"{T}/link_dangling", SYMLINK, 0o777, 0, 0, t + 15, link="does/not/exist"),  # dangling
        Entry(f"{T}/link_dir", SYMLINK, 0o777, 0, 0, t + 16, link="dir"),                  # to a directory
        hl_a := Entry(f"{T}/hl_a", FILE, 0o644, 1000, 1000, t + 17, b"hard linked\n"),  # hard link group of 3:
        hardlink(f"{T}/hl_b", hl_a),                   #  same dir,
        hardlink(f"{T}/dir/hl_c", hl_a),               #  another dir -> nlink 3
        hardlink(f"{T}/setuid_link", setuid),          # hard link to the setuid file -> nlink 2
        Entry(f"{T}/chardev", CHAR, 0o666, 0, 0, t + 18, dev=(1, 3)),    # like /dev/null
        Entry(f"{T}/blockdev", BLOCK, 0o660, 0, 6, t + 19, dev=(7, 0)),  # like /dev/loop0 (gid 6 = disk)
        Entry(f"{T}/fifo", FIFO, 0o644, 0, 0, t + 20),                    # named pipe
        Entry(f"{T}/xattr_file", FILE, 0o644, 0, 0, t + 21, b"has xattrs\n",  # user.* xattrs (PAX SCHILY)
              xattrs={"user.test": b"value"}),
        Entry(f"{T}/xattr_dir", DIR, 0o755, 0, 0, t + 22, xattrs={"user.dir": b"d"}),  # xattr on a dir
        Entry(UNICODE_NAME, FILE, 0o644, 0, 0, t + 23, b"unicode\n"),  # spaces + non-ASCII: PAX path
        Entry(f"{T}/long", DIR, 0o755, 0, 0, t + 24),                   # long path (> 100 bytes)
        Entry(f"{T}/long/" + "d" * 30, DIR, 0o755, 0, 0, t + 25),
        Entry(f"{T}/long/" + "d" * 30 + "/" + "e" * 30, DIR, 0o755, 0, 0, t + 26),
        Entry(LONG_DIR, DIR, 0o755, 0, 0, t + 27),
        Entry(LONG_FILE, FILE, 0o644, 0, 0, t + 28, b"long name\n"),
        Entry(f"{T}/mtime_zero", FILE, 0o644, 0, 0, 0, b"epoch\n"),                   # mtime 0
        Entry(f"{T}/mtime_2100", FILE, 0o644, 0, 0, 4_102_444_800, b"future\n"),      # mtime past 2038
        Entry(f"{T}/big_ids", FILE, 0o644, 65534, 65534, t + 29, b"nobody\n"),        # uid/gid 65534
        Entry(f"{T}/opq", DIR, 0o755, 0, 0, t + 30),             # made opaque by layer 2
        Entry(f"{T}/opq/a", FILE, 0o644, 0, 0, t + 31, b"a\n"),
        Entry(f"{T}/opq/b", FILE, 0o644, 0, 0, t + 32, b"b\n"),
        Entry(f"{T}/opq/sub", DIR, 0o755, 0, 0, t + 33),          # a hidden subtree too
        Entry(f"{T}/opq/sub/c", FILE, 0o644, 0, 0, t + 34, b"c\n"),
        Entry(f"{T}/gone", FILE, 0o644, 0, 0, t + 35, b"deleted by layer 2\n"),  # whiteout-ed by layer 2
        Entry(f"{T}/modified", FILE, 0o644, 0, 0, t + 36, b"version 1\n"),      # replaced by layer 2
        Entry(f"{T}/dir_gone", DIR, 0o755, 0, 0, t + 37),          # whole dir whiteout-ed by layer 3
        Entry(f"{T}/dir_gone/file", FILE, 0o644, 0, 0, t + 38, b"x\n"),
        Entry(f"{T}/reborn", FILE, 0o644, 0, 0, t + 39, b"file\n"),  # deleted (2), back as a dir (3)
        Entry(f"{T}/replaced_link", SYMLINK, 0o777, 0, 0, t + 40, link="small.txt"),  # a file in layer 3
    ]
    # ---- layer 2: whiteouts, an opaque dir, modifications --------------------------
    l2 = [
        Entry(T, DIR, 0o755, mtime=t + 101),
        Entry(f"{T}/.wh.gone", FILE, 0o644, mtime=t + 102),       # whiteout: tree/gone disappears
        Entry(f"{T}/.wh.reborn", FILE, 0o644, mtime=t + 103),     # whiteout (recreated by layer 3)
        Entry(f"{T}/opq", DIR, 0o775, 1000, 1000, t + 104),       # opaque dir: new mode/owner too
        Entry(f"{T}/opq/.wh..wh..opq", FILE, 0o644, mtime=t + 105),  # hides opq/a, opq/b, opq/sub
        Entry(f"{T}/opq/new", FILE, 0o644, 0, 0, t + 106, b"new in layer 2\n"),
        Entry(f"{T}/modified", FILE, 0o600, 1000, 1000, t + 107, b"version 2, longer\n"),  # content+mode+owner
        Entry(f"{T}/new_in_2", FILE, 0o644, 0, 0, t + 108, b"added by layer 2\n"),
    ]
    # ---- layer 3: directory whiteout, type changes ---------------------------------
    l3 = [
        Entry(T, DIR, 0o755, mtime=t + 201),
        Entry(f"{T}/.wh.dir_gone", FILE, 0o644, mtime=t + 202),   # whiteout of a whole directory
        Entry(f"{T}/reborn", DIR, 0o755, 0, 0, t + 203),          # file -> whiteout -> directory
        Entry(f"{T}/reborn/again", FILE, 0o644, 0, 0, t + 204, b"again\n"),
        Entry(f"{T}/replaced_link", FILE, 0o644, 0, 0, t + 205, b"now a file\n"),  # symlink -> file
        Entry(f"{T}/new_in_3", FILE, 0o755, 0, 0, t + 206, _pseudo_random(CHUNK, seed=3)),  # exactly 1 chunk
    ]
    return [l1, l2, l3]


def tree_layers() -> list[bytes]:
    """The three tree layers (tar bytes), to stack on ``busybox_layer()``."""
    return [layer_tar(es) for es in tree_layer_entries()]


def tree_image_layers() -> list[bytes]:
    """The runnable tree image, bottom first: busybox, then the three tree layers."""
    return [busybox_layer()] + tree_layers()


# --------------------------------------------------------------------------
# Expected merged view and the in-container listing
# --------------------------------------------------------------------------

WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"


def apply_layers(layers: Iterable[Iterable[Entry]]) -> dict[str, Entry]:
    """The merged file system (path -> Entry) of ``layers`` applied bottom first
    with OCI whiteout semantics. Hard links stay HARDLINK entries."""
    fs: dict[str, Entry] = {}

    def drop(path: str, keep_self: bool = False) -> None:
        for p in [p for p in fs if p == path or p.startswith(path + "/")]:
            if not (keep_self and p == path):
                del fs[p]

    for layer in layers:
        for e in layer:
            parent, name = str(PurePosixPath(e.path).parent), e.name
            if name == WH_OPAQUE:
                drop(parent, keep_self=True)
            elif name.startswith(WH_PREFIX):
                drop(f"{parent}/{name[len(WH_PREFIX):]}")
            else:
                old = fs.get(e.path)
                if old is not None and not (old.type == DIR and e.type == DIR):
                    drop(e.path)  # a non-dir replaces (or is replaced by) anything wholesale
                fs[e.path] = e
    return fs


@dataclass(frozen=True)
class Stat:
    """The normalized attributes ``tree_listing_command`` can observe.

    ``size``/``nlink`` are None for directories (file-system specific);
    ``group`` names a hard link group by its first path in sorted order.
    """
    type: str
    mode: int          # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    mtime: int
    size: int | None = None
    nlink: int | None = None
    target: str | None = None
    dev: tuple[int, int] | None = None
    sha256: str | None = None
    group: str | None = None


def expected_tree(root: str = TREE_ROOT, layers: list[list[Entry]] | None = None) -> dict[str, Stat]:
    """What ``parse_tree_listing`` must return for a container of the tree image.

    Keys are relative to the tree root ("." is the root itself). xattrs are not
    part of the listing (busybox has no getfattr); see ``tree_xattrs()``.
    """
    fs = apply_layers(layers if layers is not None else tree_layer_entries())
    # resolve hard links: the group is keyed by the target's path
    groups: dict[str, list[str]] = {}
    for p, e in fs.items():
        if e.type == HARDLINK:
            groups.setdefault(e.link, [e.link]).append(p)
    out: dict[str, Stat] = {}
    pre = root + "/"
    for p, e in fs.items():
        if p != root and not p.startswith(pre):
            continue
        rel = "." if p == root else p[len(pre):]
        src = fs[e.link] if e.type == HARDLINK else e
        members = groups.get(src.path)
        group = None
        if members:
            group = sorted(m[len(pre):] for m in members)[0]
        t = src.type
        out[rel] = Stat(
            type=t, mode=stat.S_IMODE(src.mode) if t != SYMLINK else 0o777,
            uid=src.uid, gid=src.gid, mtime=src.mtime,
            size=None if t == DIR else (len(src.link.encode()) if t == SYMLINK else
                                        len(src.data) if t == FILE else 0),
            nlink=None if t == DIR else (len(members) if members else 1),
            target=src.link if t == SYMLINK else None,
            dev=src.dev if t in (CHAR, BLOCK) else None,
            sha256=hashlib.sha256(src.data).hexdigest() if t == FILE else None,
            group=group,
        )
    return out


def tree_xattrs(root: str = TREE_ROOT) -> dict[str, dict[str, bytes]]:
    """Expected user.* xattrs per path relative to ``root`` (for host-side checks)."""
    fs = apply_layers(tree_layer_entries())
    pre = root + "/"
    return {p[len(pre):]: dict(e.xattrs) for p, e in fs.items() if e.xattrs and p.startswith(pre)}


# Prints, for every entry below $1 (including $1 itself as "."), one line:
# path TAB "rawmode_hex uid gid size mtime nlink major_hex minor_hex inode" TAB
# symlink target or "-" TAB sha256 of a regular file or "-".
# Uses only busybox applets (sh, find, sort, stat, readlink, sha256sum);
# busybox stat does lstat unless -L. FIFOs/devices are never opened.
_LISTING_SCRIPT = r"""
cd "$1" || exit 1
find . | sort | while IFS= read -r f; do
  s=$(stat -c '%f %u %g %s %Y %h %t %T %i' "$f") || exit 1
  l=-; if [ -h "$f" ]; then l=$(readlink "$f"); fi
  h=-; if [ -f "$f" ] && [ ! -h "$f" ]; then h=$(sha256sum "$f"); h=${h%% *}; fi
  printf '%s\t%s\t%s\t%s\n' "$f" "$s" "$l" "$h"
done
"""


def tree_listing_command(root: str = "/" + TREE_ROOT) -> list[str]:
    """argv to run in a container: one line per entry under ``root`` (see _LISTING_SCRIPT)."""
    return ["/bin/sh", "-c", _LISTING_SCRIPT, "tree-listing", root]


_S_TYPES = {stat.S_IFREG: FILE, stat.S_IFDIR: DIR, stat.S_IFLNK: SYMLINK, stat.S_IFCHR: CHAR,
            stat.S_IFBLK: BLOCK, stat.S_IFIFO: FIFO, stat.S_IFSOCK: "s"}


def parse_tree_listing(text: str) -> dict[str, Stat]:
    """Parse ``tree_listing_command`` output into ``{relpath: Stat}``, normalized
    like ``expected_tree`` (inode numbers become hard link groups)."""
    raw = {}
    by_inode: dict[int, list[str]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        path, fields, target, digest = line.split("\t")
        rawmode, uid, gid, size, mtime, nlink, major, minor, ino = fields.split()
        rel = "." if path == "." else path[2:] if path.startswith("./") else path
        mode = int(rawmode, 16)
        t = _S_TYPES[stat.S_IFMT(mode)]
        raw[rel] = (t, mode, int(uid), int(gid), int(size), int(mtime), int(nlink),
                    int(major, 16), int(minor, 16), target, digest)
        if t != DIR and int(nlink) > 1:
            by_inode.setdefault(int(ino), []).append(rel)
    group_of = {p: sorted(ps)[0] for ps in by_inode.values() for p in ps}
    out = {}
    for rel, (t, mode, uid, gid, size, mtime, nlink, major, minor, target, digest) in raw.items():
        out[rel] = Stat(
            type=t, mode=stat.S_IMODE(mode), uid=uid, gid=gid, mtime=mtime,
            size=None if t == DIR else size,
            nlink=None if t == DIR else nlink,
            target=target if t == SYMLINK else None,
            dev=(major, minor) if t in (CHAR, BLOCK) else None,
            sha256=digest if t == FILE else None,
            group=group_of.get(rel),
        )
    return out


def diff_listings(expected: dict[str, Stat], actual: dict[str, Stat]) -> list[str]:
    """Human-readable differences (empty when equal)."""
    out = []
    for p in sorted(set(expected) | set(actual)):
        e, a = expected.get(p), actual.get(p)
        if e is None:
            out.append(f"unexpected {p!r}: {a}")
        elif a is None:
            out.append(f"missing {p!r}: {e}")
        elif e != a:
            fields = [f"{k}: expected {getattr(e, k)!r}, got {getattr(a, k)!r}"
                      for k in Stat.__dataclass_fields__ if getattr(e, k) != getattr(a, k)]
            out.append(f"{p!r}: " + "; ".join(fields))
    return out


# --------------------------------------------------------------------------
# A real Python root file system (cached)
# --------------------------------------------------------------------------

_ROOTFS_VERSION = "python-rootfs-v1"  # bump when the builder's output changes
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "__phello__"}
_STDLIB_SKIP_TOP = ("site-packages", "dist-packages", "config-")


def _ldd(paths: Iterable[str]) -> set[str]:
    """Shared libraries (and the dynamic loader) ``ldd`` lists for ``paths``, as listed."""
    libs: set[str] = set()
    for p in paths:
        res = subprocess.run(["ldd", p], capture_output=True, text=True)
        if res.returncode != 0:
            continue  # "not a dynamic executable"
        for line in res.stdout.splitlines():
            parts = line.split()
            if "=>" in parts:
                i = parts.index("=>")
                if i + 1 < len(parts) and parts[i + 1].startswith("/"):
                    libs.add(parts[i + 1])
                elif "not" in parts:
                    raise RuntimeError(f"ldd {p}: {line.strip()}")
            elif parts and parts[0].startswith("/"):
                libs.add(parts[0])  # the loader: /lib64/ld-linux-x86-64.so.2
    return libs


def _stdlib_files(stdlib: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        d = Path(dirpath)
        if d == stdlib:
            dirnames[:] = [n for n in dirnames if not n.startswith(_STDLIB_SKIP_TOP)]
        dirnames[:] = sorted(n for n in dirnames if n not in _STDLIB_SKIP_DIRS)
        out.append(d)
        out += [d / n for n in sorted(filenames)]
        out += [d / n for n in dirnames if (d / n).is_symlink()]
    return out


class _RootfsBuilder:
    """Copies host paths into a tar, reproducing the host's symlinks on the way
    (Debian 12 is merged-/usr: /bin -> usr/bin, /lib -> usr/lib, /lib64 -> usr/lib64)."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry | tuple[str, Path]] = {}

    def _dir(self, rel: str, host: Path | None = None, mode: int | None = None) -> None:
        if rel and rel not in self.entries:
            if mode is None:
                mode = stat.S_IMODE(os.lstat(host).st_mode) if host else 0o755
            self.entries[rel] = Entry(rel, DIR, mode)

    def _resolve_parent(self, host_path: str) -> str:
        """Add the directories (and symlinks) leading to ``host_path``; return the
        path inside the rootfs where its last component lives (parent resolved)."""
        parts = PurePosixPath(host_path).parts[1:]
        cur = ""  # resolved relative path
        for comp in parts[:-1]:
            nxt = f"{cur}/{comp}" if cur else comp
            host = Path("/" + nxt)
            if host.is_symlink():
                target = os.readlink(host)
                self.entries.setdefault(nxt, Entry(nxt, SYMLINK, 0o777, link=target))
                resolved = os.path.normpath(os.path.join("/" + cur, target)) if not target.startswith("/") \
                    else os.path.normpath(target)
                self._resolve_parent(resolved + "/x")
                cur = resolved.lstrip("/")
            else:
                self._dir(nxt, host)
                cur = nxt
        return f"{cur}/{parts[-1]}" if cur else parts[-1]

    def add_host(self, host_path: str | Path) -> None:
        """Add a host file, directory or symlink (a symlink's target too)."""
        host_path = str(host_path)
        rel = self._resolve_parent(host_path)
        real = Path("/" + rel)
        st = os.lstat(real)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(real)
            self.entries[rel] = Entry(rel, SYMLINK, 0o777, link=target)
            tpath = target if target.startswith("/") else os.path.join(os.path.dirname("/" + rel), target)
            tpath = os.path.normpath(tpath)
            if os.path.lexists(tpath) and tpath.lstrip("/") not in self.entries:
                self.add_host(tpath)
        elif stat.S_ISDIR(st.st_mode):
            self._dir(rel, real)
        elif stat.S_ISREG(st.st_mode):
            # Keep the host mtime of regular files: the .pyc files record their
            # source's mtime, so a fixed one would make them all stale.
            self.entries[rel] = ("file", real)

    def add(self, e: Entry) -> None:
        self._resolve_parent("/" + e.path)
        self.entries[e.path] = e

    def write(self, out) -> None:
        def key(p: str):
            return PurePosixPath(p).parts
        entries = []
        for rel in sorted(self.entries, key=key):
            v = self.entries[rel]
            if isinstance(v, tuple):
                st = os.stat(v[1])
                v = Entry(rel, FILE, stat.S_IMODE(st.st_mode), mtime=int(st.st_mtime),
                          data=v[1].read_bytes())
            entries.append(v)
        write_tar(entries, out)


def _rootfs_inputs(python: str, busybox: str) -> tuple[list[str], list[Path]]:
    stdlib = Path("/usr/lib") / Path(python).name  # /usr/lib/python3.11
    dynload = sorted(str(p) for p in (stdlib / "lib-dynload").glob("*.so"))
    libs = sorted(_ldd([python, *dynload]))
    return libs, _stdlib_files(stdlib)


def _rootfs_key(python: str, busybox: str, libs: list[str], files: list[Path]) -> str:
    h = hashlib.sha256(_ROOTFS_VERSION.encode())
    for p in [python, busybox, *libs, *map(str, files)]:
        st = os.lstat(p)
        h.update(f"{p}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        if stat.S_ISLNK(st.st_mode):
            h.update(os.readlink(p).encode())
    return h.hexdigest()


_PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = b"root:x:0:\nnogroup:x:65534:\n"


def python_rootfs_tar(path: str | os.PathLike | None = None, *,
                      cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
                      python: str = PYTHON, busybox: str = BUSYBOX) -> Path:
    """A small real root file system as an uncompressed tar; returns its path.

    Contents: ``python`` (/usr/bin/python3.11, ``/usr/bin/python3`` -> it), the
    libraries ``ldd`` lists for it and for ``lib-dynload/*.so`` (so hashlib, ssl,
    sqlite3... import), the stdlib without test dirs, site-/dist-packages and
    ``config-3.11-*`` (a 25 MB static libpython), keeping the .pyc files; a static
    busybox with ``BUSYBOX_APPLETS`` links in /bin; /etc/passwd, /etc/group,
    /etc/python3.11/sitecustomize.py (the stdlib links to it), /tmp (1777), /root.
    The host's merged-/usr symlinks are reproduced (/bin -> usr/bin, ...).

    Built once per set of inputs (keyed by a hash of their paths, sizes, mtimes)
    under ``cache_dir`` and reused; with ``path`` the tar is also copied there
    (and ``path`` returned).
    """
    for need, pkg in ((python, "python3-minimal"), (busybox, "busybox-static")):
        if not os.path.exists(need):
            raise FileNotFoundError(f"{need} missing: apt-get install -y {pkg}")
    libs, files = _rootfs_inputs(python, busybox)
    key = _rootfs_key(python, busybox, libs, files)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / f"python-rootfs-{key[:24]}.tar"
    if not cached.exists():
        b = _RootfsBuilder()
        b.add_host(python)
        b.add(Entry(str(PurePosixPath(python).parent / "python3").lstrip("/"), SYMLINK, 0o777,
                    link=PurePosixPath(python).name))
        for lib in libs:
            b.add_host(lib)
        for f in files:
            b.add_host(f)
        bb = b._resolve_parent("/bin/busybox")  # usr/bin/busybox on merged-/usr
        b.entries[bb] = Entry(bb, FILE, 0o755, data=Path(busybox).read_bytes())
        bindir = str(PurePosixPath(bb).parent)
        for a in BUSYBOX_APPLETS:
            b.entries.setdefault(f"{bindir}/{a}", Entry(f"{bindir}/{a}", SYMLINK, 0o777, link="busybox"))
        b._dir("etc", mode=0o755)
        b.add(Entry("etc/passwd", FILE, 0o644, data=_PASSWD))
        b.add(Entry("etc/group", FILE, 0o644, data=_GROUP))
        b._dir("tmp", mode=0o1777)
        b._dir("root", mode=0o700)
        b._dir("var", mode=0o755)
        b._dir("var/tmp", mode=0o1777)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".python-rootfs-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                b.write(out)
            os.chmod(tmp, 0o644)
            os.replace(tmp, cached)
        except BaseException:
            os.unlink(tmp)
            raise
    if path is None:
        return cached
    path = Path(path)
    shutil.copyfile(cached, path)
    return path


# --------------------------------------------------------------------------
# A local OCI archive (for `podman load`), to get exact layers into storage
# --------------------------------------------------------------------------

def oci_archive(layers: list[bytes], out_path: str | os.PathLike, *,
                ref_name: str = "localhost/als-test/image:latest",
                cmd: list[str] | None = None) -> str:
    """Write an ``oci-archive`` holding one image made of the uncompressed
    ``layers`` (media type ``application/vnd.oci.image.layer.v1.tar``), for
    ``podman load -i``, which names the image ``ref_name`` (a full reference,
    e.g. ``127.0.0.1:5000/x/tree:1``; a bare tag-less name gets ``localhost/``). Podman applies the layers' whiteouts as real overlay
    whiteouts, unlike ``podman build`` ADD (see test_support_podman.py).
    Returns the manifest digest."""
    blobs: dict[str, bytes] = {}

    def put(data: bytes) -> str:
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[d] = data
        return d

    diff_ids = [put(l) for l in layers]
    config = {
        "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": cmd or ["/bin/sh"], "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"layer {i}"}
                    for i in range(len(layers))],
    }
    cfg = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(cfg), "size": len(cfg)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d,
                    "size": len(blobs[d])} for d in diff_ids],
    }
    man = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    mdig = put(man)
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdig,
        "size": len(man), "annotations": {"org.opencontainers.image.ref.name": ref_name}}]}
    files = [Entry("oci-layout", FILE, data=b'{"imageLayoutVersion":"1.0.0"}'),
             Entry("index.json", FILE, data=json.dumps(index, sort_keys=True).encode()),
             Entry("blobs", DIR, 0o755), Entry("blobs/sha256", DIR, 0o755)]
    files += [Entry(f"blobs/sha256/{d[7:]}", FILE, data=b) for d, b in sorted(blobs.items())]
    with open(out_path, "wb") as f:
        write_tar(files, f)
    return mdig


# --------------------------------------------------------------------------
# Small eStargz images of given files, pushed with our own writer
# --------------------------------------------------------------------------

def files_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar of regular files (mode 0644, mtime 0), in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def push_files(client, ref: str, files: dict[str, bytes], *, chunk_size: int, level: int = 9,
               prioritized: list[str] | None = None):
    """Push a one-layer eStargz image of ``files`` as ``ref``; returns the layer (an als.image.BuiltLayer)."""
    from als.tools.image import estargz_layer, push_image
    from als.reference import parse_reference
    layer = estargz_layer(io.BytesIO(files_tar(files)), chunk_size=chunk_size, level=level, prioritized=prioritized)
    push_image(client, parse_reference(ref), [layer])
    return layer


def push_zstd_files(client, ref: str, files: dict[str, bytes], *, chunk_size: int, size_annotation: bool = True):
    """Push a one-layer zstd:chunked image of ``files`` as ``ref``; returns the layer (an als.image.BuiltLayer).

    Without ``size_annotation`` the layer carries no uncompressed size, as Podman writes it.
    """
    from als.formats import zstdchunked, zstdchunked_writer
    from als.tools.image import BuiltLayer, push_image
    from als.reference import parse_reference
    blob = io.BytesIO()
    r = zstdchunked_writer.write_zstdchunked(io.BytesIO(files_tar(files)), blob, chunk_size=chunk_size)
    annotations = r.annotations()
    if not size_annotation:
        del annotations[zstdchunked.UNCOMPRESSED_SIZE_ANNOTATION]
    layer = BuiltLayer(blob=blob, digest=r.blob_digest, size=r.compressed_size, diff_id=r.diff_id,
                       annotations=annotations, media_type=zstdchunked.MEDIA_TYPE)
    push_image(client, parse_reference(ref), [layer])
    return layer
