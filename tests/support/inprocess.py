"""The store `als serve` builds, built in the test's own process and without FUSE.

For tests of the store's own decisions (which layers it keeps, declines,
rebuilds): they call `Store.layer` directly and read files through its chunk
fetcher, against a real registry, and see its log through pytest's caplog.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from als.config import load_config
from als.ops.daemon import build_store
from als.layer.resolved import Layer
from als.store.namespace import Store


@contextmanager
def store(work: Path, registries_conf: Path, config: str = "") -> Iterator[Store]:
    """A store with ``config`` (TOML text) under ``work``, reaching registries through ``registries_conf``."""
    path = work / "config.toml"
    path.write_text(config)
    cfg = load_config(path)
    cfg.registry.registries_conf = str(registries_conf)
    s = build_store(work / "root", cfg)
    try:
        yield s
    finally:
        s.close()


def read_file(store: Store, layer: Layer, path: str) -> bytes:
    """The whole content of the regular file ``path`` of ``layer``, as a container read gets it."""
    node = layer.view.lookup(path.split("/"))
    assert node is not None and node.is_reg, f"{path} is not a regular file of {layer.source.label}"
    return b"".join(store.fetcher.read(layer.source, node.chunks))
