"""Which engine asks the store, and whether its containers/storage loses lazily pulled layers.

Why: containers/storage 1.58 and later (Podman 5.5 onwards, CRI-O 1.33
onwards) record a layer taken from an additional layer store in no layers
file: ``layerStore.PutAdditionalLayer`` leaves the layer's storage location
unset, so ``saveFor`` writes it nowhere. The pull works; the next command
says ``layer not known``. Nothing the store serves can prevent it, and the
protocol never says who is asking, so the store finds out itself: every
FUSE request carries the caller's pid, and a Go program records its module
versions in its ``.go.buildinfo`` section. Builds without module versions
(Debian builds in GOPATH mode) still carry their function names in
``.gopclntab``: the code that introduced the lost location
(``layerStore.pickStoreLocation``) marks them.

Each executable is inspected once (by device, inode, size and mtime), in a
background thread, so a FUSE request never waits for it; an affected one is
logged once, with what breaks and what to do, and ``affected()`` lists it
for ``als status``.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

log = logging.getLogger("als.consumer")

STORAGE_MODULES = ("github.com/containers/storage", "go.podman.io/storage")
AFFECTED_SINCE = (1, 58, 0)  # "layers: write read only layers to imagestore"
FIXED_IN: tuple[int, int, int] | None = None  # no release has the fix yet (contrib/upstream/ has it)
ALS_FUNCTION = b"storage.(*layerStore).PutAdditionalLayer"  # any containers/storage that can use a store
LOST_LOCATION_FUNCTION = b"storage.(*layerStore).pickStoreLocation"  # came with the layer location field
MAX_PROGRAMS = 256  # distinct executables remembered; more are not inspected
_BUILDINFO_MAGIC = b"\xff Go buildinf:"
_SEMVER = re.compile(r"v(\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True)
class Consumer:
    """A program that asked the store for layers, and what its containers/storage does with them."""

    program: str  # the executable, as /proc/<pid>/exe names it
    module: str  # the containers/storage module path it was built with ("" if not recorded)
    version: str  # that module's version ("" if not recorded)
    affected: bool  # loses lazily pulled layers (containers/storage >= 1.58 without the fix)
    evidence: str  # how we know, in the operator's words

    def as_dict(self) -> dict:
        return asdict(self)


# ---- reading a Go executable ---------------------------------------------------------------

def _sections(f: mmap.mmap) -> dict[str, tuple[int, int]]:
    """name -> (file offset, size) of a little-endian ELF64 file's sections; {} for anything else."""
    if f[:4] != b"\x7fELF" or f[4] != 2 or f[5] != 1:
        return {}
    shoff, = struct.unpack_from("<Q", f, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", f, 0x3A)
    if not shoff or shentsize < 64 or shstrndx >= shnum or shoff + shnum * shentsize > len(f):
        return {}
    headers = [struct.unpack_from("<IIQQQQ", f, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    out = {}
    for name_off, kind, _flags, _addr, offset, size in headers:
        end = f.find(b"\0", names_at + name_off, names_at + name_off + 256)
        if end < 0 or kind == 8:  # SHT_NOBITS: nothing in the file
            continue
        if offset + size <= len(f):
            out[f[names_at + name_off:end].decode("ascii", "replace")] = (offset, size)
    return out


def _uvarint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while i < len(data) and shift < 64:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
    raise ValueError("bad varint")


def modinfo(buildinfo: bytes) -> str:
    """The module information text of a ``.go.buildinfo`` section (Go >= 1.18), or "" if it has none."""
    if not buildinfo.startswith(_BUILDINFO_MAGIC) or len(buildinfo) < 32 or not buildinfo[15] & 2:
        return ""  # before Go 1.18 the strings are behind pointers; no containers/storage this old matters
    try:
        n, i = _uvarint(buildinfo, 32)  # the Go version
        n, i = _uvarint(buildinfo, i + n)
    except ValueError:
        return ""
    text = buildinfo[i:i + n]
    if len(text) >= 33 and text[-17] == 0x0A:  # 16-byte sentinels around the text
        text = text[16:-16]
    return text.decode("utf-8", "replace")


def storage_dependency(info: str) -> tuple[str, str]:
    """(module path, version) of the containers/storage module in a modinfo text; ("", "") if none.

    A ``=>`` line replaces the module before it; a replacement by a local
    directory has no version, so the version is then unknown.
    """
    found = ("", "")
    current = ""
    for line in info.splitlines():
        fields = line.split("\t")
        if fields[0] in ("dep", "mod") and len(fields) >= 3:
            current = fields[1]
            if current in STORAGE_MODULES:
                found = (current, fields[2])
        elif fields[0] == "=>" and current in STORAGE_MODULES:
            found = (current, fields[2] if len(fields) >= 3 and _SEMVER.match(fields[2]) else "")
    return found


def _version_tuple(version: str) -> tuple[int, int, int] | None:
    m = _SEMVER.match(version)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def version_affected(module: str, version: str) -> bool:
    """Whether containers/storage ``version`` (of ``module``) loses lazily pulled layers."""
    v = _version_tuple(version)
    if v is None:
        return False
    return v >= AFFECTED_SINCE and (FIXED_IN is None or v < FIXED_IN)


def inspect(path: str, program: str = "") -> Consumer | None:
    """What the Go executable at ``path`` says about its containers/storage; None if it has none."""
    try:
        with open(path, "rb") as f:
            return inspect_file(f, program or path)
    except OSError:
        return None


def inspect_file(f, program: str) -> Consumer | None:
    """``inspect`` of an open executable; ``program`` names it in messages."""
    try:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            sections = _sections(m)
            if ".go.buildinfo" in sections:
                off, size = sections[".go.buildinfo"]
                module, version = storage_dependency(modinfo(m[off:off + min(size, 1 << 20)]))
                if version:
                    affected = version_affected(module, version)
                    return Consumer(program, module, version, affected, f"build info: {module} {version}")
            if ".gopclntab" not in sections:
                return None
            off, size = sections[".gopclntab"]
            name_at = m.find(ALS_FUNCTION, off, off + size)
            if name_at < 0:
                return None  # not a containers/storage user, or one without additional layer stores
            tail = len(b"storage")
            module = next((mod for mod in STORAGE_MODULES
                           if m[name_at + tail - len(mod):name_at + tail] == mod.encode()), "")
            lost = m.find(LOST_LOCATION_FUNCTION, off, off + size) >= 0
            evidence = ("function table (no module versions recorded): "
                        + ("it has the layer-location code of containers/storage 1.58 and later" if lost
                           else "it has no layer-location code, so it is older than containers/storage 1.58"))
            return Consumer(program, module, "", lost and FIXED_IN is None, evidence)
    except (OSError, ValueError, struct.error):
        return None


# ---- the registry of programs seen ----------------------------------------------------------

class Consumers:
    """Programs that asked the store for layers, inspected once each.

    ``seen(pid)`` is cheap enough for every request that names a layer (one
    ``stat`` of ``/proc/<pid>/exe``); a new executable is read in the
    background.
    """

    def __init__(self, proc: str = "/proc"):
        self._proc = proc
        self._lock = threading.Lock()
        self._programs: dict[tuple[int, int, int, int], Consumer | None] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="als-consumer")

    def seen(self, pid: int) -> None:
        """Note that process ``pid`` asked for a layer (the FUSE request's caller)."""
        exe = f"{self._proc}/{pid}/exe"
        try:
            st = os.stat(exe)
        except OSError:
            return  # gone already, or not ours to look at
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._programs or len(self._programs) >= MAX_PROGRAMS:
                return
            self._programs[key] = None
        try:  # opened now: the process may be gone by the time it is read
            f = open(exe, "rb")
            program = os.readlink(exe)
        except OSError:
            return
        try:
            self._pool.submit(self._inspect, key, f, program)
        except RuntimeError:
            f.close()  # shutting down

    def _inspect(self, key: tuple[int, int, int, int], f, program: str) -> None:
        with f:
            consumer = inspect_file(f, program)
        with self._lock:
            self._programs[key] = consumer
        if consumer is not None and consumer.affected:
            where = f"{consumer.module} {consumer.version}" if consumer.version else "its containers/storage"
            log.warning(
                "%s asks this store for layers, and %s loses layers pulled from any additional layer store "
                "(containers/storage 1.58 and later do not record them: the pull works, later commands say "
                "'layer not known'; evidence: %s). Use Podman 5.4 or older (CRI-O 1.32 or older), or a build "
                "with the fix in contrib/upstream/ (README: 'Podman and CRI-O versions')",
                consumer.program, where, consumer.evidence)
        elif consumer is not None:
            log.info("%s asks this store for layers (%s)", consumer.program, consumer.evidence)

    def wait(self, timeout: float = 10.0) -> None:
        """Let inspections under way finish (tests and status use it; FUSE never does)."""
        self._pool.submit(lambda: None).result(timeout=timeout)

    def all(self) -> list[Consumer]:
        with self._lock:
            return [c for c in self._programs.values() if c is not None]

    def affected(self) -> list[Consumer]:
        """Programs whose containers/storage loses lazily pulled layers."""
        return [c for c in self.all() if c.affected]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
