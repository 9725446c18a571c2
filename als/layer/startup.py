"""What a container start reads first, predicted, so that it is fetched before it is asked for.

Lazy pulling pays one registry round trip per file a starting container
misses, one after another: Podman reads /etc/passwd and /etc/group, the
kernel maps the program, the dynamic loader opens ld.so.cache and each shared
library in turn, an interpreter imports its start-up modules. Those reads are
predictable from the layer alone: the image's entrypoint program, for any
program the libraries its ELF header names, and for an interpreter the files
it reads on every start. Fetching them side by side when the layer resolves,
and as soon as a program is first read, turns a chain of round trips into one.

Nothing here is needed for correctness: a wrong guess costs bytes, never a
wrong answer, and every read still goes through the verified fetch path.
"""

from __future__ import annotations

import logging
import posixpath
import re
import stat
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from als.layer.view import LayerView, Node

log = logging.getLogger("als.startup")

LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu",
            "lib/aarch64-linux-gnu", "usr/lib64", "lib64", "usr/lib", "lib", "usr/local/lib")
START_FILES = (
    "etc/passwd", "etc/group",  # Podman reads both on every run (the container's user and groups)
    "etc/ld.so.cache",  # the dynamic loader, for every dynamically linked program
    "etc/localtime",  # glibc, for the first local time (a link into /usr/share/zoneinfo)
    # glibc, when a program calls setlocale(): the C.UTF-8 locale (Debian's directory, or the
    # archive other distributions use) and the character set converters' cache
    "usr/lib/locale/C.utf8/LC_CTYPE", "usr/lib/locale/C.UTF-8/LC_CTYPE", "usr/lib/locale/locale-archive",
    *(f"{d}/gconv/gconv-modules.cache" for d in LIB_DIRS[:6]),
)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_LINKS = 8  # symlink hops followed inside a layer
MAX_NEEDED = 64  # DT_NEEDED entries taken from one program

# CPython 3.N imports these from its standard library on every start, by name: they are known as
# soon as the interpreter is run, before its own ELF header is in. From 3.11 on, the rest of its
# start-up modules are frozen into the interpreter; before, they were read from there too.
CPYTHON = re.compile(r"python3\.([0-9]{1,2})")
CPYTHON_START = ("encodings/__init__", "encodings/aliases", "encodings/utf_8", "sitecustomize")
CPYTHON_START_BEFORE_3_11 = ("abc", "codecs", "io", "os", "stat", "_collections_abc", "posixpath", "genericpath",
                             "_sitebuiltins", "site")

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB = 0, 1, 5


def resolve(view: LayerView, path: str) -> Node | None:
    """The regular file at ``path`` in the layer, following symlinks inside it as the container would."""
    return resolve_path(view, path)[0]


def resolve_path(view: LayerView, path: str) -> tuple[Node | None, str]:
    """``resolve``, and the path the file was found at once the symlinks are followed."""
    todo = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    node, hops = view.root, 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            node = view.lookup(done)
            continue
        child = (node.children or {}).get(part) if node is not None else None
        if child is None:
            return None, ""
        if stat.S_ISLNK(child.mode):
            hops += 1
            if hops > MAX_LINKS:
                return None, ""
            if child.target.startswith("/"):
                done, node = [], view.root
            todo = [p for p in child.target.split("/") if p not in ("", ".")] + todo
            continue
        done.append(part)
        node = child
    return (node, "/".join(done)) if node is not None and node.is_reg else (None, "")


def entrypoint(config: dict) -> list[str]:
    """Where the program an image runs by default (Entrypoint, else Cmd) may be, in PATH order."""
    cfg = config.get("config") if isinstance(config, dict) else None
    if not isinstance(cfg, dict):
        return []
    argv = (cfg.get("Entrypoint") or []) + (cfg.get("Cmd") or [])
    if not argv or not isinstance(argv[0], str) or not argv[0]:
        return []
    prog = argv[0]
    if "/" in prog:
        return [prog]
    path = DEFAULT_PATH
    for env in cfg.get("Env") or []:
        if isinstance(env, str) and env.startswith("PATH="):
            path = env[5:]
    return [posixpath.join(d, prog) for d in path.split(":") if d.startswith("/")]


def program(view: LayerView, candidates: Iterable[str]) -> tuple[Node | None, str]:
    """The first candidate path that is a file in the layer, and where it is once symlinks are followed."""
    return next((found for c in candidates if (found := resolve_path(view, c))[0] is not None), (None, ""))


def interpreter_files(view: LayerView, path: str) -> list[Node]:
    """What the interpreter at ``path`` (in the layer, symlinks followed) reads on every start.

    CPython 3.N (``<prefix>/bin/python3.N``): its start-up modules in
    ``<prefix>/lib/python3.N``, compiled (``__pycache__``) where the layer has
    them, else their source. Empty for any other program.
    """
    bindir, _, name = path.rpartition("/")
    m = CPYTHON.fullmatch(name)
    if m is None:
        return []
    minor = int(m.group(1))
    stdlib = posixpath.join(posixpath.dirname(bindir), "lib", f"python3.{minor}")
    out = []
    for module in CPYTHON_START + (CPYTHON_START_BEFORE_3_11 if minor < 11 else ()):
        package, _, base = module.rpartition("/")
        compiled = posixpath.join(stdlib, package, "__pycache__", f"{base}.cpython-3{minor}.pyc")
        node = resolve(view, compiled) or resolve(view, posixpath.join(stdlib, f"{module}.py"))
        if node is not None:
            out.append(node)
    return out


def elf_needs(read: Callable[[int, int], bytes]) -> tuple[str, list[str]]:
    """The dynamic loader (PT_INTERP) and libraries (DT_NEEDED) an ELF file names; empty if not ELF.

    ``read(offset, size)`` gives the file's bytes (fewer at its end): only the
    headers, the dynamic section and the names are read, not the whole file.
    Every offset comes from the file and is checked: a hostile file yields
    nothing, never an exception.
    """
    try:
        return _elf_needs(read)
    except (struct.error, ValueError, IndexError, OverflowError, UnicodeDecodeError):
        return "", []


def elf_needs_of(data: bytes) -> tuple[str, list[str]]:
    """``elf_needs`` of a file held whole."""
    return elf_needs(lambda offset, size: data[offset:offset + size] if 0 <= offset else b"")


def _elf_needs(read: Callable[[int, int], bytes]) -> tuple[str, list[str]]:
    head = read(0, 64)
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
        return "", []
    wide, order = head[4] == 2, "<" if head[5] == 1 else ">"
    if wide:
        phoff = struct.unpack_from(order + "Q", head, 32)[0]
        phentsize, phnum = struct.unpack_from(order + "HH", head, 54)
        ph = struct.Struct(order + "IIQQQQQQ")  # type, flags, offset, vaddr, paddr, filesz, memsz, align
        dyn = struct.Struct(order + "qQ")
    else:
        phoff = struct.unpack_from(order + "I", head, 28)[0]
        phentsize, phnum = struct.unpack_from(order + "HH", head, 42)
        ph = struct.Struct(order + "IIIIIIII")  # type, offset, vaddr, paddr, filesz, memsz, flags, align
        dyn = struct.Struct(order + "iI")
    if not ph.size <= phentsize <= 256:  # 32 or 56 in practice; a larger one only makes reads bigger
        return "", []
    phnum = min(phnum, 256)
    table = read(phoff, phnum * phentsize)
    interp, dynamic, loads = "", None, []
    for i in range(phnum):
        f = ph.unpack_from(table, i * phentsize)
        ptype, offset, vaddr, filesz = (f[0], f[2], f[3], f[5]) if wide else (f[0], f[1], f[2], f[4])
        if ptype == PT_INTERP:
            interp = read(offset, min(filesz, 4096)).split(b"\0", 1)[0].decode()
        elif ptype == PT_DYNAMIC:
            dynamic = (offset, min(filesz, 4096 * dyn.size))
        elif ptype == PT_LOAD:
            loads.append((vaddr, offset, filesz))
    if dynamic is None:
        return interp, []
    section = read(*dynamic)
    needed, strtab = [], None
    for i in range(len(section) // dyn.size):
        tag, val = dyn.unpack_from(section, i * dyn.size)
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED and len(needed) < MAX_NEEDED:
            needed.append(val)
        elif tag == DT_STRTAB:
            strtab = next((val - v + o for v, o, n in loads if v <= val < v + n), None)
    if strtab is None:
        return interp, []
    names = []
    for off in needed:
        raw = read(strtab + off, 256).split(b"\0", 1)[0]
        if raw and b"/" not in raw:
            names.append(raw.decode())
    return interp, names


def libraries(view: LayerView, interp: str, needed: Iterable[str]) -> list[Node]:
    """The loader and the named libraries as the layer has them (in the usual directories)."""
    out = []
    if interp:
        node = resolve(view, interp)
        if node is not None:
            out.append(node)
    for name in needed:
        node = next((n for d in LIB_DIRS if (n := resolve(view, f"{d}/{name}")) is not None), None)
        if node is not None:
            out.append(node)
    return out


class Predictor:
    """Fetches predicted files side by side, a few at a time, off the read path."""

    def __init__(self, fetcher, max_request: int, workers: int = 4):
        self.fetcher, self.max_request = fetcher, max_request
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="als-predict")
        self._lock = threading.Lock()
        self._seen: set[tuple[int, int]] = set()  # (id(view), ino) already predicted

    def start(self, layer, entrypoint: list[str]) -> None:
        """A layer just resolved: fetch what any container start of its image reads first."""
        view = layer.view
        files = [n for n in (resolve(view, p) for p in START_FILES) if n is not None]
        prog, path = program(view, entrypoint)
        if prog is not None:
            files.append(prog)
            self.after_exec(layer, prog, path)
        self._fetch(layer, files)

    def after_exec(self, layer, node: Node, path: str = "") -> None:
        """``node`` (at ``path``) is a program being run: fetch the loader and libraries it names
        and, if it is an interpreter, the files it reads on every start; once. Not once the
        background fetch fills the layer: past the start-up burst, a container reading programs (a
        tar, a scan) would have them guessed one after another, each guess a round trip that cuts
        the background's stream into pieces."""
        if layer.source.filling:
            return
        with self._lock:
            key = (id(layer.view), node.ino)
            if key in self._seen:
                return
            self._seen.add(key)
        self._pool.submit(self._libraries_of, layer, node)
        self._fetch(layer, interpreter_files(layer.view, path))  # side by side: a round trip, not one each

    def _libraries_of(self, layer, node: Node) -> None:
        def read(offset: int, size: int) -> bytes:  # through the cache, like a container's read
            chunks = node.chunks_for(offset, size) if offset >= 0 else []
            if not chunks:
                return b""
            return self.fetcher.read_span(layer.source, chunks, offset, min(offset + size, node.size),
                                          warming=True)
        try:
            interp, needed = elf_needs(read)
            self._fetch(layer, libraries(layer.view, interp, needed))
        except Exception as e:  # a prediction never fails anything
            log.debug("%s: predicting the libraries of a program failed: %s", layer.source.label, e)

    def _fetch(self, layer, nodes: list[Node]) -> None:
        for node in nodes:
            if node.chunks:
                self._pool.submit(self._prefetch, layer, node)

    def _prefetch(self, layer, node: Node) -> None:
        try:
            self.fetcher.prefetch(layer.source, node.chunks, self.max_request)
        except Exception as e:
            log.debug("%s: predicted fetch failed: %s", layer.source.label, e)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
