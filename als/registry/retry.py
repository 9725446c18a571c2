"""How long and how often a registry request is tried again.

A lazily pulled file read waits on a registry request from a FUSE thread:
it must end, by success or by an error, within a bounded time even when the
registry is overloaded or the network flaky. One policy bounds every
request by a count and a wall-clock deadline, backs off with jitter, and
honours the server's Retry-After within that bound.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from ..errors import RegistryError, TransientError
from .deadline import request_deadline

log = logging.getLogger("als.registry")

T = TypeVar("T")


@dataclass
class RetryPolicy:
    """``retries`` after the first try, exponential backoff capped at ``max_backoff``,
    everything (waits included) within ``deadline`` seconds."""

    retries: int = 3
    backoff: float = 0.2
    max_backoff: float = 5.0
    deadline: float = 60.0

    def __post_init__(self) -> None:
        self.retries = max(0, self.retries)

    def run(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` until it does not raise TransientError, within count and deadline.

        Requests made inside ``fn`` are bounded by the deadline too (deadline.py);
        giving up turns the last TransientError into a plain RegistryError.
        """
        deadline = time.monotonic() + self.deadline
        attempt = 0
        while True:
            try:
                with request_deadline(deadline):
                    return fn()
            except TransientError as exc:
                attempt += 1
                delay = min(self.max_backoff, self.backoff * (2 ** (attempt - 1)))
                delay *= 0.5 + random.random() / 2
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, self.max_backoff))
                if attempt > self.retries or time.monotonic() + delay > deadline:
                    raise RegistryError(f"{exc} (gave up after {attempt} "
                                        f"attempt{'s' if attempt > 1 else ''})") from None
                log.info("%s; retry %d/%d in %.1f s", exc, attempt, self.retries, delay)
                time.sleep(delay)


def retry_after(value: str | None) -> float | None:
    """A Retry-After header in seconds, or None (an HTTP-date is ignored)."""
    if value and value.strip().isdigit():
        return float(value.strip())
    return None
