"""The package layout keeps reading like the data flow (README, "How it works").

The packages are ordered from the registry to the kernel; each may import the
basics and the packages before it, never one after it, so that a reader can
follow a request from `fuse/` down to `registry/` without meeting a loop. The
imports are read from the source (function-level ones included), so a cycle
hidden inside a function counts too.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ALS = Path(__file__).resolve().parents[1] / "als"
# The data flow, left to right; ops and tools sit on top (tools talk to a running store through ops).
ORDER = ("registry", "formats", "fetch", "layer", "store", "fuse", "rootfs", "ops", "tools")
BASICS = frozenset({"als", "als.errors", "als.digest", "als.reference", "als.oci", "als.config", "als.metrics",
                    "als.wait", "als.files"})
ENTRY_POINTS = frozenset({"als.cli", "als.__main__"})
MAX_LINES = 500


@dataclass(frozen=True)
class Import:
    importer: str
    module: str  # the als module imported from
    name: str  # the name taken from it ("" for `import x`)
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(ALS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ALS.rglob("*.py"))}


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[Import]:
    """Every import of an als module in ``path``, resolved to the module that holds the name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(name, a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "als"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "als":
                continue
            for a in node.names:  # `from als.x import y`: y is a module of its own, or a name of als.x
                sub = f"{source}.{a.name}"
                found.append(Import(name, sub, "", node.lineno) if sub in known
                             else Import(name, source, a.name, node.lineno))
    return found


def all_imports() -> list[Import]:
    known = modules()
    return [i for name, path in known.items() for i in imports_of(name, path, known)]


def rank(module: str) -> int:
    """Where a module sits in the flow: -1 for the basics, the index of its package otherwise."""
    if module in BASICS:
        return -1
    parts = module.split(".")
    return ORDER.index(parts[1]) if len(parts) >= 2 and parts[1] in ORDER else len(ORDER)


def test_every_module_is_placed():
    """A new module goes into a package of the flow (or is added to the basics on purpose)."""
    unplaced = [m for m in modules() if m not in ENTRY_POINTS and rank(m) == len(ORDER)]
    assert not unplaced, f"modules outside the packages of the data flow: {unplaced}"


def test_imports_follow_the_data_flow():
    wrong = [f"{i.importer} (line {i.line}) imports {i.module}" for i in all_imports()
             if i.importer not in ENTRY_POINTS and rank(i.module) > rank(i.importer)]
    assert not wrong, "a package imports one later in the flow:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for i in all_imports():
        if i.module in graph and i.module != i.importer:
            graph[i.importer].add(i.module)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_no_private_name_crosses_modules():
    crossing = [f"{i.importer} (line {i.line}) takes {i.module}.{i.name}" for i in all_imports()
                if i.name.startswith("_") and not i.name.startswith("__")]
    assert not crossing, "\n".join(crossing)


def test_each_package_says_what_it_holds():
    silent = [m for m, p in modules().items() if p.name == "__init__.py" and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not silent, f"packages without a docstring: {silent}"


def test_modules_stay_small():
    big = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by job): {big}"
