"""The import graph of a Python package, and its cycles.

    python tools/import_graph.py deepcore          # prints each cycle; exit 1 if there is one

Every ``import`` counts, also those inside functions: a lazy import hides a cycle from the
interpreter but not from a reader, and it breaks as soon as someone moves it to the top.
An edge goes to the module that is named (``from .a import b`` goes to ``pkg.a.b`` when that is
a module, else to ``pkg.a``), not to the packages above it, whose ``__init__`` every submodule
import runs anyway.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def modules(package_dir: Path) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is_package)}`` for every ``.py`` file under ``package_dir``."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join(parts)] = (path, is_package)
    return out


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}``."""
    mods = modules(package_dir)
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, (path, is_package) in mods.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[:len(here) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    if full in mods:
                        graph[name].add(full)
                    elif target in mods:
                        graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-import), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0], "__init__.py").is_file():
        print("usage: python tools/import_graph.py PACKAGE_DIR", file=sys.stderr)
        return 2
    found = cycles(import_graph(Path(args[0]).resolve()))
    for component in found:
        print("import cycle: " + " <-> ".join(component))
    if not found:
        print(f"{args[0]}: no import cycle")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
