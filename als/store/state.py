"""What the store remembers across restarts: manifests, configs, TOCs, and the ids of images and layers.

Podman bakes ``<mount>/<ref>/<digest>/diff`` into its graph root for good, so
after a restart the store must answer for layers of tags that may have moved
since, and should not need the registry just to rebuild a layer's tree. Small
immutable metadata is kept here, keyed by digest, and checked against that
digest whenever it is read back.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

from als.files import atomic_write, private_dir
from als.digest import hex_of, sha256_digest
from als.store.ids import IdTable

log = logging.getLogger("als.state")

_REFERRERS = "referrers of "  # a manifest's referrers are recorded as a ref's manifests are, under this


class StateDir:
    def __init__(self, root: Path):
        self.root = private_dir(Path(root))
        for sub in ("blobs", "tocs", "refs"):
            private_dir(self.root / sub)
        self._lock = threading.Lock()
        self.ids = IdTable(self.root / "ids")  # node ids and layer ids that outlive the process

    def _write(self, path: Path, data: bytes) -> None:
        atomic_write(path, data, path.parent)

    def put_blob(self, digest: str, data: bytes) -> None:
        """Keep a manifest or config (the caller has verified ``data`` against ``digest``)."""
        path = self.root / "blobs" / hex_of(digest)
        if not path.exists():
            self._write(path, data)

    def get_blob(self, digest: str) -> bytes | None:
        try:
            data = (self.root / "blobs" / hex_of(digest)).read_bytes()
        except OSError:
            return None
        return data if sha256_digest(data) == digest else None

    def put_toc(self, toc_digest: str, toc_offset: int, member: bytes) -> None:
        """Keep a TOC's raw bytes and blob offset; parsing them again verifies the digest."""
        path = self.root / "tocs" / hex_of(toc_digest)
        if not path.exists():
            self._write(path, b"%d\n" % toc_offset + member)

    def has_toc(self, toc_digest: str) -> bool:
        """Whether a TOC is saved (``get_toc`` still checks it can be used)."""
        try:
            return (self.root / "tocs" / hex_of(toc_digest)).exists()
        except ValueError:  # not a digest: nothing saved under it
            return False

    def get_toc(self, toc_digest: str) -> tuple[int, bytes] | None:
        """``(toc_offset, member)`` as saved by ``put_toc``, or None."""
        try:
            data = (self.root / "tocs" / hex_of(toc_digest)).read_bytes()
            offset, _, member = data.partition(b"\n")
            return int(offset), member
        except (OSError, ValueError):
            return None

    def _ref_file(self, ref: str) -> Path:
        return self.root / "refs" / hashlib.sha256(ref.encode()).hexdigest()

    def add_manifest(self, ref: str, manifest_digest: str) -> None:
        """Record that ``ref`` once resolved to ``manifest_digest``."""
        with self._lock:
            known = self.manifests(ref)
            if manifest_digest not in known:
                self._write(self._ref_file(ref), "\n".join([manifest_digest, *known]).encode())

    def manifests(self, ref: str) -> list[str]:
        """Manifest digests ``ref`` resolved to, newest first."""
        try:
            text = self._ref_file(ref).read_text()
        except OSError:
            return []
        return [line for line in text.splitlines() if line.startswith("sha256:")]

    def add_referrer(self, subject_digest: str, referrer_digest: str) -> None:
        """Record a referrer of manifest ``subject_digest`` (kept with ``put_blob``)."""
        self.add_manifest(_REFERRERS + subject_digest, referrer_digest)

    def referrers(self, subject_digest: str) -> list[str]:
        """The referrers of manifest ``subject_digest`` recorded, newest first."""
        return self.manifests(_REFERRERS + subject_digest)
