"""Which tests need real parts (a registry process, a FUSE mount, Podman, root), decided from their code.

`make test-fast` runs the tests that need none of them (``-m "not real"``).
Nobody has to remember a marker: a test is marked ``real`` when its function,
the fixtures it uses (transitively) or the test helpers they call reach one of
the real parts below, by name or by the program they run, or when it is
``slow`` or ``soak``. The code is read from the functions' code objects, not
their text, so comments and docstrings do not count.

Reading code can miss a path (a real part reached through an object's method
passed in from elsewhere), so ``guard`` stands behind it: in a test left
unmarked, starting a real part fails at once, naming the marker to add, rather
than making the fast tier slow or root-bound.
"""

from __future__ import annotations

import os
import subprocess
import types
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import pytest

# Modules whose every class and function is a real part (or starts one).
REAL_MODULES = frozenset({
    "tests.support.registry", "tests.support.store_process", "tests.support.containerd",
    "tests.support.podman5", "tests.support.rootless", "als.tools.podman",
})
# Programs that mount, need root, or are a container engine or a registry, as argv[0] string constants.
REAL_PROGRAMS = frozenset({
    "mount", "umount", "fusermount", "fusermount3", "podman", "docker-registry", "containerd", "ctr",
    "ctr-remote", "unshare", "nsenter", "setpriv", "useradd", "userdel", "debootstrap", "chroot",
})
MARK = "real"
# How deep helper calls are followed; the suite's helpers nest a few levels at most.
MAX_DEPTH = 8


def _code_names(code: types.CodeType) -> tuple[set[str], set[str]]:
    """The global and attribute names, and the string constants, of ``code`` and the code nested in it."""
    names: set[str] = set()
    strings: set[str] = set()
    todo = [code]
    while todo:
        c = todo.pop()
        names.update(c.co_names)
        for k in c.co_consts:
            if isinstance(k, types.CodeType):
                todo.append(k)
            elif isinstance(k, str):
                strings.add(k)
            elif isinstance(k, tuple):
                strings.update(s for s in k if isinstance(s, str))
    return names, strings


def _ours(obj: object) -> bool:
    """Test code of this suite, whose helpers are followed (the package under test is not)."""
    return (getattr(obj, "__module__", "") or "").startswith("tests")


class Reach:
    """Answers, with memory, whether a function's code reaches a real part."""

    def __init__(self) -> None:
        self._known: dict[types.CodeType, bool] = {}

    def function(self, fn: Callable, depth: int = 0) -> bool:
        fn = getattr(fn, "__func__", fn)  # bound methods
        fn = getattr(fn, "__wrapped__", fn)  # decorators that keep the original
        inner = getattr(getattr(fn, "hypothesis", None), "inner_test", None)  # hypothesis' @given
        fn = inner or fn
        code = getattr(fn, "__code__", None)
        if code is None or depth > MAX_DEPTH:
            return False
        if code in self._known:
            return self._known[code]
        self._known[code] = False  # recursion ends here while this one is being read
        names, strings = _code_names(code)
        found = bool(strings & REAL_PROGRAMS) or self._names(names, getattr(fn, "__globals__", {}), depth)
        self._known[code] = found
        return found

    def _names(self, names: set[str], scope: dict, depth: int) -> bool:
        for name in names:
            obj = scope.get(name)
            if isinstance(obj, types.ModuleType):
                if obj.__name__ in REAL_MODULES:
                    return True
                if obj.__name__.startswith("tests"):  # module.helper: follow the helpers named here
                    if any(self._object(getattr(obj, n, None), depth) for n in names):
                        return True
            elif obj is not None and self._object(obj, depth):
                return True
        return False

    def _object(self, obj: object, depth: int) -> bool:
        if obj is None or isinstance(obj, types.ModuleType):
            return False
        if getattr(obj, "__module__", None) in REAL_MODULES:
            return True
        if not _ours(obj):
            return False
        if isinstance(obj, type):
            return any(self.function(v, depth + 1) for v in vars(obj).values()
                       if isinstance(v, (types.FunctionType, staticmethod, classmethod, property)))
        return callable(obj) and self.function(obj, depth + 1)


def needs_real_parts(item: pytest.Item, reach: Reach) -> bool:
    """Whether ``item`` is slow or soak, or its function or any fixture it uses reaches a real part."""
    if item.get_closest_marker("slow") or item.get_closest_marker("soak"):
        return True
    fn = getattr(item, "function", None)
    if fn is not None and reach.function(fn):
        return True
    info = getattr(item, "_fixtureinfo", None)  # pytest has no public accessor for the fixture closure
    names = info.name2fixturedefs.items() if info is not None else ()
    return any(reach.function(d.func) for _, fixturedefs in names for d in fixturedefs)


def mark_real(items: Iterable[pytest.Item]) -> None:
    """Add the ``real`` marker to every item that needs real parts."""
    reach = Reach()
    for item in items:
        if not item.get_closest_marker(MARK) and needs_real_parts(item, reach):
            item.add_marker(MARK)


def _refuse(what: str) -> Callable:
    def refuse(*args, **kwargs):
        pytest.fail(f"this test starts {what}, but it is not marked `{MARK}`, so `make test-fast` runs it: "
                    f"add @pytest.mark.{MARK} (tests/support/tiers.py did not see it from the code)",
                    pytrace=False)
    return refuse


@contextmanager
def guarded() -> Iterator[None]:
    """Starting a real part fails inside: around an unmarked test's setup, call and teardown (its
    module's fixtures included, which a test-scoped fixture would come too late for)."""
    monkeypatch = pytest.MonkeyPatch()
    try:
        guard(monkeypatch)
        yield
    finally:
        monkeypatch.undo()


def guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make starting a real part fail until ``monkeypatch`` is undone."""
    from als.tools.podman import Podman
    from tests.support.containerd import ContainerdProcess
    from tests.support.registry import RegistryProcess
    from tests.support.rootless import RootlessUser
    from tests.support.store_process import StoreProcess

    monkeypatch.setattr(RegistryProcess, "start", _refuse("a registry process"))
    monkeypatch.setattr(StoreProcess, "start", _refuse("`als serve` with a FUSE mount"))
    monkeypatch.setattr(ContainerdProcess, "start", _refuse("containerd"))
    monkeypatch.setattr(Podman, "__init__", _refuse("Podman"))
    monkeypatch.setattr(RootlessUser, "__init__", _refuse("a rootless user"))
    popen_init = subprocess.Popen.__init__

    def checked(self, args, *rest, **kwargs):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        words = os.fsdecode(argv[0]).split() if argv else []
        program = os.path.basename(words[0]) if words else ""
        if program in REAL_PROGRAMS:
            _refuse(f"the program {program}")()
        popen_init(self, args, *rest, **kwargs)
    monkeypatch.setattr(subprocess.Popen, "__init__", checked)
