"""Bounded waits that a FUSE interrupt can end.

A FUSE request that waits (for a chunk, a resolve, a blob) must give up as
soon as the kernel interrupts it, or its thread stays taken for the rest of
the deadline after its caller was killed.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from als.errors import Interrupted

POLL = 0.1  # seconds between looks at the cancel event: the kernel is answered at once anyway


def wait_for(fut: Future, deadline: float | None, cancel: threading.Event | None = None):
    """``fut``'s result by ``deadline`` (time.monotonic(); None: however long it takes);
    FutureTimeout after it, Interrupted once ``cancel`` is set. The future's own exception is
    raised as it is."""
    while True:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if cancel is None:
            return fut.result(timeout=left)
        if cancel.is_set():
            raise Interrupted("the caller went away")
        try:
            return fut.result(timeout=POLL if left is None else min(left, POLL))
        except FutureTimeout:
            if deadline is not None and time.monotonic() >= deadline:
                raise
