"""Fixtures the tool tests share."""

from __future__ import annotations

import pytest

from tests.support import images


@pytest.fixture(scope="module")
def python_rootfs() -> bytes:
    """The Debian+python3 root file system as one tar (built once, cached on disk)."""
    return images.python_rootfs_tar().read_bytes()
