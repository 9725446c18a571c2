"""Libraries `als serve` never uses, kept out of its memory.

``requests`` imports a character-set detector (charset_normalizer, or
chardet) for one purpose: guessing the encoding of a response body read as
text when the server named none (``Response.text``, ``apparent_encoding``).
The store reads bodies as bytes and JSON, never so; the detector and the
codecs it loads cost about 3.5 MiB of the daemon's resident memory, a
tenth of it at idle. Without one, requests guesses UTF-8 instead.
"""

from __future__ import annotations

import sys
import warnings

DETECTORS = ("charset_normalizer", "chardet")


def without_charset_detection() -> None:
    """Make requests find no character-set detector; call it before anything imports requests."""
    if "requests" in sys.modules:
        return  # too late: it has its detector already
    for name in DETECTORS:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # an import of it now fails
    # requests says, once, that it found none: that is the point.
    warnings.filterwarnings("ignore", message="Unable to find acceptable character detection dependency")
