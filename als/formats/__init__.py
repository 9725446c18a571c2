"""Layer formats: eStargz and zstd:chunked read and written, the neutral TOC, and the one interface (lazy.py) als serves them by."""
