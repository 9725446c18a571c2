"""Predicting what a container start reads: ELF dependencies, entrypoints, symlinks inside a layer."""

import os
import random
import shutil
import struct

import pytest

from als.formats import toc as T
from als.layer.view import LayerView
from als.layer.startup import Predictor, elf_needs_of, entrypoint, libraries, program, resolve


def E(name, type=T.REG, **kw):
    return T.Entry(name=name, type=type, **kw)


def chunk(size):
    return [T.Chunk(offset=0, size=size, blob_start=0, blob_end=10, digest="sha256:" + "0" * 64)]


@pytest.fixture
def view():
    return LayerView([
        E("", T.DIR, mode=0o755),
        E("usr", T.DIR, mode=0o755),
        E("usr/bin", T.DIR, mode=0o755),
        E("usr/bin/dash", mode=0o755, size=3, chunks=chunk(3)),
        E("usr/bin/python3.11", mode=0o755, size=3, chunks=chunk(3)),
        E("usr/bin/python3", T.SYMLINK, linkname="python3.11"),
        E("bin", T.SYMLINK, linkname="usr/bin"),
        E("lib64", T.SYMLINK, linkname="/usr/lib64"),
        E("usr/lib64", T.DIR, mode=0o755),
        E("usr/lib64/ld-linux-x86-64.so.2", T.SYMLINK, linkname="../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
        E("usr/lib/x86_64-linux-gnu", T.DIR, mode=0o755),
        E("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", mode=0o755, size=3, chunks=chunk(3)),
        E("usr/lib/x86_64-linux-gnu/libc.so.6", mode=0o644, size=3, chunks=chunk(3)),
        E("usr/lib/x86_64-linux-gnu/libm.so.6", mode=0o644, size=3, chunks=chunk(3)),
        E("usr/bin/sh", T.SYMLINK, linkname="dash"),
        E("loop", T.SYMLINK, linkname="loop"),
        E("up", T.SYMLINK, linkname="../../../etc/passwd"),
        E("etc/passwd", size=3, chunks=chunk(3)),
    ])


def test_symlinks_are_followed_inside_the_layer(view):
    dash = view.lookup(["usr", "bin", "dash"])
    assert resolve(view, "/bin/sh") is dash  # bin -> usr/bin, sh -> dash
    assert resolve(view, "/usr/bin/python3") is view.lookup(["usr", "bin", "python3.11"])
    ld = view.lookup(["usr", "lib", "x86_64-linux-gnu", "ld-linux-x86-64.so.2"])
    assert resolve(view, "/lib64/ld-linux-x86-64.so.2") is ld  # absolute, then relative with ".."
    assert resolve(view, "/up") is view.lookup(["etc", "passwd"])  # ".." stops at the layer's root
    assert resolve(view, "/loop") is None  # a cycle ends
    assert resolve(view, "/usr/bin") is None  # directories are not files
    assert resolve(view, "/nothing/here") is None


def test_the_entrypoint_is_found_on_the_image_path(view):
    cfg = {"config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["sh", "-c", "x"]}}
    assert entrypoint(cfg) == ["/usr/local/bin/sh", "/usr/bin/sh", "/bin/sh"]
    assert program(view, entrypoint(cfg)) is view.lookup(["usr", "bin", "dash"])
    assert entrypoint({"config": {"Entrypoint": ["/usr/bin/python3"], "Cmd": ["-c", "1"]}}) == ["/usr/bin/python3"]
    for bad in ({}, {"config": None}, {"config": {"Cmd": []}}, {"config": {"Cmd": [7]}}, [], {"config": "x"}):
        assert entrypoint(bad) == []


@pytest.mark.parametrize("path", ["/bin/sh", "/usr/bin/python3", "/bin/ls"])
def test_real_programs_name_their_loader_and_libraries(path):
    real = shutil.which(os.path.basename(path)) or path
    if not os.path.exists(real):
        pytest.skip(f"{path} is not on this machine")
    interp, needed = elf_needs_of(open(os.path.realpath(real), "rb").read())
    assert interp.startswith("/lib") and "ld-linux" in interp
    assert "libc.so.6" in needed


def test_libraries_are_looked_up_where_the_loader_looks(view):
    found = libraries(view, "/lib64/ld-linux-x86-64.so.2", ["libm.so.6", "libc.so.6", "libmissing.so.1"])
    lib = ["usr", "lib", "x86_64-linux-gnu"]
    assert found == [view.lookup(lib + ["ld-linux-x86-64.so.2"]), view.lookup(lib + ["libm.so.6"]),
                     view.lookup(lib + ["libc.so.6"])]


def test_hostile_or_foreign_bytes_yield_nothing():
    real = open(os.path.realpath(shutil.which("sh")), "rb").read()
    rng = random.Random(5)
    cases = [b"", b"\x7fELF", b"#!/bin/sh\n", b"\x7fELF" + bytes(60), real[:64], real[:200]]
    cases.append(real[:32] + struct.pack("<Q", 1 << 60) + real[40:])  # program headers far outside
    cases.append(real[:54] + struct.pack("<HH", 56, 0xFFFF) + real[58:])  # more headers than bytes
    for _ in range(300):
        b = bytearray(real[:8192])
        for _ in range(rng.randrange(1, 40)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases.append(bytes(b))
    for data in cases:
        interp, needed = elf_needs_of(data)  # never raises
        assert isinstance(interp, str) and isinstance(needed, list) and len(needed) <= 64
    assert elf_needs_of(b"#!/bin/sh\n") == ("", [])


def test_a_resolved_layer_has_its_start_files_program_and_libraries_fetched_before_any_read(
        registry, client, registries_conf, tmp_path):
    """End to end: after the lookup alone, reading what the program needs sends nothing to the registry."""
    import io
    import time

    from als.tools.image import estargz_layer, image_config, push_image
    from als.reference import parse_reference
    from tests.support import images
    from tests.support.store_process import StoreProcess

    prog = os.path.realpath(shutil.which("true"))
    interp, needed = elf_needs_of(open(prog, "rb").read())
    libdir = "usr/lib/x86_64-linux-gnu"
    if not interp or not all(os.path.exists(f"/{libdir}/{n}") for n in needed):
        pytest.skip("needs a dynamically linked true(1) with its libraries in /usr/lib/x86_64-linux-gnu")
    files = {"etc/passwd": b"root:x:0:0::/root:/bin/sh\n", "usr/bin/true": open(prog, "rb").read(),
             **{f"{libdir}/{n}": open(f"/{libdir}/{n}", "rb").read() for n in needed},
             f"{libdir}/ld-linux-x86-64.so.2": open(os.path.realpath(interp), "rb").read()}
    filler = {f"usr/share/doc/f{i}": os.urandom(64 << 10) for i in range(40)}  # never predicted
    entries = [images.Entry(d, images.DIR, 0o755) for d in ("etc", "usr", "usr/bin", "usr/lib", libdir,
                                                             "usr/share", "usr/share/doc", "lib64")]
    entries += [images.Entry(p, images.FILE, 0o755, data=d) for p, d in {**filler, **files}.items()]
    entries.append(images.Entry("lib64/ld-linux-x86-64.so.2", images.SYMLINK, 0o777,
                                link=f"/{libdir}/ld-linux-x86-64.so.2"))
    layer = estargz_layer(io.BytesIO(images.layer_tar(entries)), chunk_size=64 << 10)
    ref = f"{registry.host}/startup:true"
    push_image(client, parse_reference(ref), [layer], config=image_config([layer], cmd=["true"]))
    with StoreProcess(tmp_path, registries_conf=registries_conf, config="[fetch]\nbackground = false\n") as s:
        start = registry.mark()
        diff = s.layer_dir(ref, layer.digest) / "diff"
        assert os.path.isdir(diff)
        seen, deadline = -1, time.monotonic() + 30
        while time.monotonic() < deadline:  # the predictions run in the background: wait until quiet
            n = len(registry.accesses_since(start, settle=0.5))
            if n == seen:
                break
            seen = n
        mark = registry.mark()
        for path, data in files.items():
            assert (diff / path).read_bytes() == data
        assert [a.uri for a in registry.accesses_since(mark) if a.written] == []  # all there already
        mark = registry.mark()
        assert (diff / "usr/share/doc/f7").read_bytes() == filler["usr/share/doc/f7"]
        assert any(a.written for a in registry.accesses_since(mark))  # what is not predicted is fetched


def test_programs_read_once_the_background_fetch_fills_the_layer_are_not_predicted(view):
    """Past the start-up burst, a tar or a scan reads every program: guessing the libraries of
    each would only cut the background fetch's stream into round trips."""
    import threading
    from types import SimpleNamespace

    asked, done = [], threading.Event()

    class Fetcher:
        def read_span(self, source, chunks, start, end, warming=False):
            asked.append(source.name)
            done.set()
            return b"\0" * (end - start)  # no ELF: nothing more is predicted

    predictor = Predictor(Fetcher(), 1 << 20, workers=1)  # one worker: what is submitted runs in order
    try:
        dash, python = view.lookup(["usr", "bin", "dash"]), view.lookup(["usr", "bin", "python3.11"])
        predictor.after_exec(SimpleNamespace(view=view, source=SimpleNamespace(name="filling", filling=True)), dash)
        predictor.after_exec(SimpleNamespace(view=view, source=SimpleNamespace(name="starting", filling=False)),
                             python)
        assert done.wait(10)
        assert asked == ["starting"]
    finally:
        predictor.close()
