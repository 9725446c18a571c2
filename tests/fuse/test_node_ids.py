"""Node ids outlive the store: a second store on the same state directory answers the first one's ids.

After a restart that keeps the FUSE connection, the kernel goes on asking by
the node ids the previous process handed out, with no lookup first. Here the
first store is closed and a second is built on the same state and cache
directories (what `als serve` does on start), over the same in-memory
registry, and asked only by those ids.
"""

from __future__ import annotations

import errno
import random

import pytest

from als.fuse import abi
from als.fuse.abi import FuseError
from als.fuse.session import WouldBlock
from als.store.ids import IdTable
from tests.support import images, memstore
from tests.support.memregistry import MANIFEST, RANGE, MemoryRegistry

REF = "registry.test/als/ids:1"
FILES = {f"d/f{i}": random.Random(i).randbytes(200_000) for i in range(4)}


def layer_of(names):
    return memstore.estargz([images.Entry(n, data=FILES[n]) for n in names], chunk_size=64 << 10)


def test_a_second_store_answers_every_node_id_of_the_first_without_a_lookup(tmp_path):
    registry = MemoryRegistry()
    layers = [layer_of(["d/f0", "d/f1"]), layer_of(["d/f2", "d/f3"])]
    memstore.push(registry, REF, layers)
    with memstore.harness(tmp_path, registry=registry) as h:
        image = h.walk(memstore.ref_dir(REF))
        top = h.layer(REF, layers[1].digest)
        diff = h.layer(REF, layers[1].digest, "diff")
        d = h.layer(REF, layers[1].digest, "diff", "d")
        read_before = h.layer(REF, layers[1].digest, "diff", "d", "f2")
        never_read = h.layer(REF, layers[1].digest, "diff", "d", "f3")
        info = h.layer(REF, layers[1].digest, "info")
        other = h.layer(REF, layers[0].digest, "diff", "d", "f0")
        assert h.read_all(read_before) == FILES["d/f2"]
        before = {n: h.getattr(n) for n in (image, top, diff, d, read_before, never_read, info, other)}
        listing = h.names(d)
        info_bytes = h.read_all(info)
        h.cache.flush()
    ranges = len(registry.served(RANGE))
    registry.fail(MANIFEST, times=100)  # nothing may wait for the image to resolve again

    with memstore.harness(tmp_path, registry=registry) as h2:
        # a reader thread is never held up: a node of a layer not in memory waits on the pool
        with pytest.raises(WouldBlock):
            h2.fs.adopt(never_read, h2.request(abi.READ, never_read, can_wait=False))
        for nodeid in before:  # what the session does before answering any request on a node
            h2.fs.adopt(nodeid, h2.request(abi.GETATTR, nodeid))
        assert {n: h2.getattr(n) for n in before} == before
        assert h2.names(d) == listing
        assert h2.read_all(info) == info_bytes
        assert h2.read_all(read_before) == FILES["d/f2"]
        assert len(registry.served(RANGE)) == ranges  # TOC from the state dir, bytes from the cache
        assert h2.read_all(never_read) == FILES["d/f3"]  # fetched now, checked against its chunk digests
        assert h2.read_all(other) == FILES["d/f0"]
        # a lookup under a node taken over gives the same id as before
        assert h2.lookup(d, "f3").nodeid == never_read
        assert h2.lookup(image, layers[1].digest).nodeid == top
        h2.fs.forget(never_read, 5)  # counts from before the restart are unknown: nothing breaks
        assert h2.read(never_read, 0, 4) == FILES["d/f3"][:4]
        with pytest.raises(FuseError) as e:  # an id never handed out
            h2.fs.adopt((1 << 40) | 7, h2.request(abi.GETATTR, 0))
        assert e.value.errno == errno.ESTALE


def test_ids_survive_a_torn_record_and_stay_unique(tmp_path):
    path = tmp_path / "ids"
    t = IdTable(path)
    a, b = t.image("r:1"), t.layer("r:1", "sha256:" + "a" * 64)
    assert (a, b) == (1, 2) and t.image("r:1") == 1
    t.close()
    with open(path, "ab") as f:
        f.write(b"0badc0de [3,\"layer\",\"r:1\"")  # a crash in the middle of a record
    t = IdTable(path)
    assert t.image("r:1") == a and t.layer("r:1", "sha256:" + "a" * 64) == b
    c = t.layer("r:1", "sha256:" + "c" * 64)
    assert c == 3 and t.name(c) == ("layer", "r:1", "sha256:" + "c" * 64)
    t.close()
    t = IdTable(path)  # the torn record was cut off before the new one was appended
    assert t.name(3) == ("layer", "r:1", "sha256:" + "c" * 64) and t.find("image", "r:1") == 1
    t.close()
    flipped = bytearray(path.read_bytes())
    flipped[-5] ^= 1  # a damaged record is not trusted, nor anything after it
    path.write_bytes(bytes(flipped))
    t = IdTable(path)
    assert t.name(3) is None and t.name(2) is not None
    assert t.layer("r:1", "sha256:" + "d" * 64) == 3
    t.close()
