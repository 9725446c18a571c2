"""Building a layer: the cyclic garbage collector is paused while a TOC is parsed and its tree
built, and always resumed afterwards, whatever the nesting or the outcome."""

from __future__ import annotations

import gc
import threading

import pytest

from als.store.build import gc_paused
from tests.support import images
from tests.support.memstore import estargz, harness, push


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_the_collector_is_paused_while_any_build_runs_and_resumed_after_the_last(collector_on):
    first, second = threading.Event(), threading.Event()
    done = threading.Event()

    def other_build():
        with gc_paused():
            first.set()
            second.wait(10)
        done.set()

    t = threading.Thread(target=other_build)
    with gc_paused():
        assert not gc.isenabled()
        t.start()
        assert first.wait(10)
    assert not gc.isenabled()  # the other build still runs
    second.set()
    t.join(10)
    assert done.is_set() and gc.isenabled()


def test_a_failed_build_resumes_the_collector(collector_on):
    with pytest.raises(RuntimeError):
        with gc_paused():
            raise RuntimeError("a TOC that does not parse")
    assert gc.isenabled()


def test_a_collector_turned_off_elsewhere_stays_off(collector_on):
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()


def test_resolving_a_layer_leaves_the_collector_on(tmp_path, collector_on):
    layer = estargz([images.Entry("etc/hostname", data=b"box\n")])
    with harness(tmp_path, "[fuse]\nxattr_free_mount = false\n[fetch]\nbackground = false\npredict = false\n") as h:
        push(h.registry, "reg.test/app:1", [layer])
        node = h.layer("reg.test/app:1", layer.digest, "diff", "etc", "hostname")
        assert h.read_all(node) == b"box\n"
    assert gc.isenabled()
