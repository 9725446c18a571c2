"""Predicting what a container start reads: ELF dependencies, entrypoints, symlinks inside a layer."""

import os
import random
import shutil
import struct

import pytest

from als.formats import toc as T
from als.layer.view import LayerView
from als.layer.startup import Predictor, elf_needs_of, entrypoint, interpreter_files, libraries, program, resolve


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
    assert program(view, entrypoint(cfg)) == (view.lookup(["usr", "bin", "dash"]), "usr/bin/dash")
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
    # The program is named as CPython is (its start-up modules come too, known by that name),
    # and run through a link, as `python3` is.
    stdlib = "usr/lib/python3.11"
    modules = {f"{stdlib}/encodings/__pycache__/{m}.cpython-311.pyc": os.urandom(3000)
               for m in ("__init__", "aliases", "utf_8")}
    files = {"etc/passwd": b"root:x:0:0::/root:/bin/sh\n", "usr/bin/python3.11": open(prog, "rb").read(),
             **{f"{libdir}/{n}": open(f"/{libdir}/{n}", "rb").read() for n in needed},
             f"{libdir}/ld-linux-x86-64.so.2": open(os.path.realpath(interp), "rb").read(), **modules}
    filler = {f"usr/share/doc/f{i}": os.urandom(64 << 10) for i in range(40)}  # never predicted
    filler[f"{stdlib}/encodings/__pycache__/latin_1.cpython-311.pyc"] = os.urandom(3000)  # not a start-up module
    entries = [images.Entry(d, images.DIR, 0o755) for d in ("etc", "usr", "usr/bin", "usr/lib", libdir,
                                                             "usr/share", "usr/share/doc", "lib64", stdlib,
                                                             f"{stdlib}/encodings", f"{stdlib}/encodings/__pycache__")]
    # the modules first: far from the blob's tail, which the store reads for the TOC and keeps
    entries += [images.Entry(p, images.FILE, 0o755, data=d) for p, d in {**modules, **filler, **files}.items()]
    entries.append(images.Entry("lib64/ld-linux-x86-64.so.2", images.SYMLINK, 0o777,
                                link=f"/{libdir}/ld-linux-x86-64.so.2"))
    entries.append(images.Entry("usr/bin/python3", images.SYMLINK, 0o777, link="python3.11"))
    layer = estargz_layer(io.BytesIO(images.layer_tar(entries)), chunk_size=64 << 10)
    ref = f"{registry.host}/startup:python"
    push_image(client, parse_reference(ref), [layer], config=image_config([layer], cmd=["python3"]))
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
        for path in ("usr/share/doc/f7", f"{stdlib}/encodings/__pycache__/latin_1.cpython-311.pyc"):
            mark = registry.mark()
            assert (diff / path).read_bytes() == filler[path]
            assert any(a.written for a in registry.accesses_since(mark)), path  # not predicted: fetched


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


def python_layer():
    """CPython 3.11 as Debian lays it out (compiled start-up modules, sitecustomize a link to /etc),
    and a 3.9 under /usr/local with sources only."""
    lib, local = "usr/lib/python3.11", "usr/local/lib/python3.9"
    entries = [E("", T.DIR, mode=0o755)]
    entries += [E(d, T.DIR, mode=0o755) for d in ("usr", "usr/bin", "usr/local", "usr/local/bin", "etc",
                                                   "etc/python3.11", lib, f"{lib}/__pycache__", f"{lib}/encodings",
                                                   f"{lib}/encodings/__pycache__", local, f"{local}/encodings")]
    files = ["usr/bin/python3.11", "usr/bin/dash", "usr/local/bin/python3.9", "etc/python3.11/sitecustomize.py",
             f"{lib}/encodings/__init__.py", f"{lib}/encodings/utf_8.py", f"{lib}/os.py",
             f"{lib}/encodings/__pycache__/__init__.cpython-311.pyc",
             f"{lib}/encodings/__pycache__/utf_8.cpython-311.pyc",
             f"{lib}/encodings/__pycache__/aliases.cpython-311.pyc", f"{lib}/__pycache__/sitecustomize.cpython-311.pyc",
             f"{lib}/__pycache__/os.cpython-311.pyc", f"{lib}/__pycache__/json.cpython-311.pyc",
             f"{local}/encodings/__init__.py", f"{local}/encodings/utf_8.py", f"{local}/os.py", f"{local}/site.py",
             f"{local}/json.py"]
    entries += [E(f, mode=0o755, size=3, chunks=chunk(3)) for f in files]
    entries += [E(f"{lib}/sitecustomize.py", T.SYMLINK, linkname="/etc/python3.11/sitecustomize.py"),
                E("usr/bin/python3", T.SYMLINK, linkname="python3.11")]
    return LayerView(entries)


def test_cpython_is_known_by_name_to_read_its_start_up_modules():
    view = python_layer()

    def nodes(*paths):
        return [view.lookup(p.split("/")) for p in paths]
    lib, local = "usr/lib/python3.11", "usr/local/lib/python3.9"
    # 3.11 reads its encodings and Debian's sitecustomize, compiled; the rest is frozen into it
    assert interpreter_files(view, "usr/bin/python3.11") == nodes(
        f"{lib}/encodings/__pycache__/__init__.cpython-311.pyc", f"{lib}/encodings/__pycache__/aliases.cpython-311.pyc",
        f"{lib}/encodings/__pycache__/utf_8.cpython-311.pyc", f"{lib}/__pycache__/sitecustomize.cpython-311.pyc")
    # before 3.11, os, site and the others too; sources where nothing is compiled; what is missing is skipped
    assert interpreter_files(view, "usr/local/bin/python3.9") == nodes(
        f"{local}/encodings/__init__.py", f"{local}/encodings/utf_8.py", f"{local}/os.py", f"{local}/site.py")
    for other in ("usr/bin/python3", "usr/bin/python3.11x", "usr/bin/dash", ""):
        assert interpreter_files(view, other) == []  # python3 is a link's name: the kernel runs its target
    assert program(view, ["/usr/bin/python3"]) == (nodes("usr/bin/python3.11")[0], "usr/bin/python3.11")


def test_an_interpreters_start_up_files_are_fetched_without_waiting_for_its_header():
    """The libraries wait for the program's ELF header to come in; CPython's modules are known by
    its name alone and are asked for at once, side by side."""
    import threading
    from types import SimpleNamespace

    prefetched, fetched, read, header_waited = [], threading.Event(), threading.Event(), []

    class Fetcher:
        def read_span(self, source, chunks, start, end, warming=False):
            header_waited.append(fetched.wait(10))  # the header comes only once the modules were asked for
            read.set()
            return b"\0" * (end - start)

        def prefetch(self, source, chunks, max_request):
            prefetched.append(len(chunks))
            if len(prefetched) == 4:
                fetched.set()

    view = python_layer()
    predictor = Predictor(Fetcher(), 1 << 20)
    try:
        layer = SimpleNamespace(view=view, source=SimpleNamespace(filling=False))
        predictor.after_exec(layer, view.lookup(["usr", "bin", "python3.11"]), "usr/bin/python3.11")
        assert fetched.wait(10) and read.wait(20)
        assert prefetched == [1, 1, 1, 1]  # the four files, each in a prefetch of its own
        read.clear()
        predictor.after_exec(layer, view.lookup(["usr", "bin", "dash"]), "usr/bin/dash")  # not an interpreter
        assert read.wait(10)  # its libraries were looked for; nothing more was prefetched
    finally:
        predictor.close()
    assert header_waited == [True, True]
    assert prefetched == [1, 1, 1, 1]
