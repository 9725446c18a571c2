"""Chunks of a layer blob: range requests to the registry, decompression, verification, and the disk cache."""
