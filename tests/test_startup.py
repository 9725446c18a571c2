"""Predicting what a container start reads: ELF dependencies, entrypoints, symlinks inside a layer."""

import os
import random
import shutil
import struct

import pytest

from als.formats import toc as T
from als.layer import LayerView
from als.startup import elf_needs, entrypoint, libraries, program, resolve


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
    interp, needed = elf_needs(open(os.path.realpath(real), "rb").read())
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
        interp, needed = elf_needs(data)  # never raises
        assert isinstance(interp, str) and isinstance(needed, list) and len(needed) <= 64
    assert elf_needs(b"#!/bin/sh\n") == ("", [])
