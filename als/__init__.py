"""als: a lazy-pulling Additional Layer Store for Podman and CRI-O."""

__version__ = "0.1.0"
