"""The store's own files: written whole or not at all, in directories no one else may use.

The cache, the state directory, the rootfs records and the hand-over record
all hold what other users must not read or redirect (private images'
content, where they are mounted), and are rewritten by a daemon that may be
killed at any moment.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from pathlib import Path

from als.errors import CacheError

log = logging.getLogger("als.files")


def atomic_write(path: Path, data: bytes, tmp_dir: Path, *, quiet_errnos: tuple[int, ...] = ()) -> int:
    """Write ``data`` under a temporary name and rename it into place; 0, or the errno of the failure.

    A crash leaves either nothing or the whole file under ``path``, never a
    prefix of it. Failures (a full disk, a read-only directory) are logged
    (unless their errno is in ``quiet_errnos``, which the caller handles) and
    reported: callers keep serving from memory.
    """
    tmp = tmp_dir / f".{path.name}.{os.getpid()}.{threading.get_ident()}"
    try:
        # owner-only whatever the umask; never through a link planted under the temporary name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return 0
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if e.errno not in quiet_errnos:
            log.warning("cannot store %s: %s", path, e)
        return e.errno or errno.EIO


def private_dir(path: Path) -> Path:
    """Create ``path`` or check it: a real directory of ours, mode 0700, whatever the umask.

    The cache holds the content of private images, and the daemon (root) empties
    and writes into these directories: one another user could open, or swap for
    a symbolic link, would let them read that content or make the daemon delete
    and write files elsewhere.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(exist_ok=True, mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise CacheError(f"{path} is not a directory owned by uid {os.geteuid()} (a symbolic link, or "
                         "someone else's): refusing to keep the cache or state there")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path
