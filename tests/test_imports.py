"""No import cycles inside morph: the modules form a layered graph.

Every module under morph/, cli/ and recipes/ (installed as ``morph``, ``morph.cli`` and ``morph.recipes``) is
parsed with ``ast``, without importing anything, and every import of a morph module is an edge: at module level,
inside functions, and under ``if TYPE_CHECKING:`` alike (a cycle hidden in a function or a type annotation is
still two modules that need each other). Importing ``a.b.c`` also runs the package ``a.b``'s ``__init__``, so an
edge goes to every package on the way that is not already a package of the importing module (those are
being imported before it, whatever it does).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"morph": "morph", "cli": "morph.cli", "recipes": "morph.recipes"}  # source folder -> import name


def _modules() -> dict[str, Path]:
    """Import name -> file, for every module of the three source folders."""
    out = {}
    for folder, name in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((name, *rel))] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The morph modules that ``name`` imports (anywhere in the file), each with the line of its first import."""
    package = name if _is_package(path) else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    targets: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        own = set(_ancestors(name))
        for t in [*(a for a in _ancestors(target) if a not in own), target]:
            if t in modules and t != name:
                targets.setdefault(t, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            for alias in node.names:
                sub = f"{base_name}.{alias.name}"
                if sub in modules:  # ``from pkg import module``: the module (and pkg's __init__, via add)
                    add(sub, node.lineno)
                elif base_name in modules:  # ``from module import name``: the module's namespace, even an ancestor's
                    if base_name != name:
                        targets.setdefault(base_name, node.lineno)
                    add(base_name, node.lineno)
    return targets


def _graph() -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}, modules


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as one cycle through them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_one_cycle(graph, set(c)) for c in comps]


def _one_cycle(graph: dict[str, dict[str, int]], comp: set[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component (breadth-first)."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w in comp and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def _describe(cycle: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> str:
    steps = [f"{a} -> {b} ({modules[a].relative_to(ROOT)}:{graph[a][b]})" for a, b in zip(cycle[:-1], cycle[1:], strict=True)]
    return "\n  ".join(steps)


def test_no_import_cycles():
    graph, modules = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n  " + "\n\n  ".join(_describe(c, graph, modules) for c in cycles)


def test_the_graph_sees_every_kind_of_import():
    """The parser finds what the cycle check relies on: relative and absolute imports at every level, in
    functions and under TYPE_CHECKING, and the package ``__init__`` an import runs."""
    graph, modules = _graph()
    assert set(modules) >= {"morph", "morph.cli", "morph.recipes", "morph.graph", "morph.growth", "morph.cli.main"}
    assert "morph.errors" in graph["morph.graph.coupling"]           # from ..errors import MorphError
    assert "morph.graph.rules" in graph["morph.graph.analyze"]       # from . import rules
    assert "morph.zoo" in graph["morph.growth.mixturegrowth"]        # inside a function
    assert "morph.growth" in graph["morph.fuse"]                     # the package __init__ on the way
    assert "morph" in graph["morph.cli.fuse"]                        # import morph (an ancestor's namespace)
    assert "morph.recipes.run" in graph["morph.cli.train"]           # from morph.recipes.run import main


def test_a_cycle_is_found_and_printed(tmp_path, monkeypatch):
    """The check fails on a cycle, however the import is written, and prints its edges."""
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "morph" / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "morph" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from morph import a\n")
    (tmp_path / "cli" / "c.py").write_text("import morph.a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph, modules = _graph()
    cycles = _cycles(graph)
    assert cycles == [["morph.a", "morph.b", "morph.a"]]
    assert _describe(cycles[0], graph, modules) == "morph.a -> morph.b (morph/a.py:2)\n  morph.b -> morph.a (morph/b.py:3)"
