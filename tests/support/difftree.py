"""A layer's `diff` as the kernel shows it, against what its tar says it should be.

The same comparison serves every way a layer reaches a reader: through the
store's mount, after `als convert`, and zstd:chunked layers Podman wrote.
Each side becomes path -> (type, mode, owner, size, content digest, link
target, xattrs), with whiteouts and opaque markers converted as overlayfs
wants them.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile


def expected_tree(tar_bytes: bytes) -> dict[str, tuple]:
    """path -> comparable tuple, after overlay conversion of whiteouts and opaque markers."""
    out: dict[str, tuple] = {}
    contents: dict[str, bytes] = {}
    links: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        for m in tf.getmembers():
            name = os.path.normpath("/" + m.name).lstrip("/")
            if not name:
                continue
            parent, base = os.path.split(name)
            if base == ".wh..wh..opq":
                out[parent] = out[parent][:-1] + ({"trusted.overlay.opaque": b"y", "user.overlay.opaque": b"y"},)
                continue
            if base.startswith(".wh."):
                wpath = os.path.join(parent, base[4:])
                # a whiteout keeps its tar entry's owner and time, as every entry does
                out.setdefault(wpath, ("char", 0, m.uid, m.gid, int(m.mtime), (0, 0), "", None, {}))
                continue
            xattrs = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                      for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            if m.islnk():
                target = os.path.normpath("/" + m.linkname).lstrip("/")
                links[name] = target
                out[name] = out[target]
                continue
            kind = {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.CHRTYPE: "char",
                    tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}.get(m.type, "reg")
            digest = None
            if kind == "reg":
                contents[name] = tf.extractfile(m).read()
                digest = hashlib.sha256(contents[name]).hexdigest()
            dev = (m.devmajor, m.devminor) if kind in ("char", "block") else (0, 0)
            out[name] = (kind, m.mode & 0o7777, m.uid, m.gid, int(m.mtime), dev,
                         m.linkname if kind == "symlink" else "", digest, xattrs)
    return out


def actual_tree(diff: str) -> tuple[dict[str, tuple], dict[str, os.stat_result]]:
    out, stats = {}, {}
    for dirpath, dirnames, filenames in os.walk(diff):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, diff)
            st = os.lstat(p)
            stats[rel] = st
            kind = {stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
                    stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFREG: "reg"}[stat.S_IFMT(st.st_mode)]
            digest = None
            if kind == "reg":
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            xattrs = {x: os.getxattr(p, x, follow_symlinks=False) for x in os.listxattr(p, follow_symlinks=False)}
            dev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else (0, 0)
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime), dev,
                        os.readlink(p) if kind == "symlink" else "", digest, xattrs)
    return out, stats
