"""Progress lines for long commands: shown on a terminal, silent in pipes and logs.

One line per task, rewritten in place with a carriage return at most a few
times a second, so a multi-GB conversion shows it is alive without flooding a
terminal; when stderr is not a terminal nothing is printed at all, because a
log full of carriage returns helps nobody.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class Progress:
    """Reports ``done`` of ``total`` bytes for one task at a time."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None, interval: float = 0.25):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.interval = interval
        self._label = ""
        self._total = 0
        self._done = 0
        self._start = 0.0
        self._last = 0.0

    def start(self, label: str, total: int) -> None:
        self._label, self._total, self._done = label, total, 0
        self._start = self._last = time.monotonic()
        self._draw()

    def advance(self, n: int) -> None:
        self._done += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._draw()

    def finish(self, note: str = "") -> None:
        self._draw(final=True, note=note)

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _draw(self, final: bool = False, note: str = "") -> None:
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self._start, 1e-6)
        rate = self._done / elapsed
        total = f" / {_mib(self._total)}" if self._total else ""
        line = f"{self._label}: {_mib(self._done)}{total}  {_mib(rate)}/s"
        if note:
            line += f"  {note}"
        self.stream.write("\r\x1b[K" + line + ("\n" if final else ""))
        self.stream.flush()
