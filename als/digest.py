"""sha256 digests in the "sha256:<hex>" form OCI uses everywhere."""

from __future__ import annotations

import hashlib
import re

_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_sha256(value: str) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def hex_of(digest: str) -> str:
    """The hex part of a sha256 digest, safe to use as a file name."""
    if not is_sha256(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest[len("sha256:"):]
