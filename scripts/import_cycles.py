#!/usr/bin/env python3
"""Print every import cycle inside the edge_ensemble package; exit 1 if there is one.

Every ``import`` / ``from ... import`` statement of every module counts, at module level and inside functions
alike (a deferred import only moves the cycle to run time), except those under ``if TYPE_CHECKING:``, which
never run. An import of ``a.b.c`` is an edge to ``a.b.c`` and to the packages above it (their ``__init__`` runs
first), up to but not including ``edge_ensemble`` itself (its ``__init__`` imports nothing at import time);
``from a import b`` is an edge to ``a.b`` when that is a module, else to ``a``. The implicit edge to a package
above the imported module is left out when that package is one the importer itself is in (its ``__init__`` is
already running), but an explicit import of such a package (``from . import NAME`` in a submodule) counts.

    python scripts/import_cycles.py [PACKAGE_DIR]

Nothing is imported: the sources are parsed with :mod:`ast`. :func:`import_graph` and :func:`cycles` are used by
tests/test_structure.py.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "edge_ensemble"

# An import edge: importer -> imported, with where the import statement is (file:line).
Graph = dict[str, dict[str, list[str]]]


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` by dotted name (a package by its own name, for its ``__init__.py``)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree`` outside ``if TYPE_CHECKING:`` blocks (their ``else:`` counts)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str], root: str) -> list[str]:
    """The modules of the package ``root`` that ``node`` (in ``module``) imports."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            stem = ".".join([*base, *([node.module] if node.module else [])])
        else:
            stem = node.module or ""
        names = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
    out = []
    for name in names:
        if name in known:
            out.append(name)  # what the statement names, even a package above ``module``
        parts = name.split(".")
        for i in range(len(parts) - 1, 1, -1):  # the packages above it run first, unless already running:
            parent = ".".join(parts[:i])   # the root package, and the packages above ``module``
            if parent in known and parent != root and not module.startswith(parent + "."):
                out.append(parent)
    return list(dict.fromkeys(out))


def import_graph(package: Path = PACKAGE) -> Graph:
    """importer -> imported -> ["file:line", ...] for every import between two modules of ``package``."""
    modules = module_names(package)
    known = set(modules)
    graph: Graph = {name: {} for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text("utf-8"), str(path))
        for node in _imports(tree):
            for target in _targets(node, name, path.name == "__init__.py", known, package.name):
                if target != name:
                    where = f"{path.relative_to(package.parent)}:{node.lineno}"
                    graph[name].setdefault(target, []).append(where)
    return graph


def cycles(graph: Graph, ignore: set[tuple[str, str]] = frozenset()) -> list[list[str]]:  # type: ignore[assignment]
    """The strongly connected components of more than one module (each one holds at least one cycle), sorted;
    ``ignore``: edges (importer, imported) left out."""
    edges = {a: sorted(b for b in targets if (a, b) not in ignore) for a, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan's algorithm
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, []):
            if w not in index:
                strongconnect(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return sorted(found)


def describe(graph: Graph, component: list[str]) -> str:
    """The import statements that tie ``component`` together, one per line."""
    inside = set(component)
    lines = [f"cycle among {', '.join(component)}:"]
    for a in component:
        for b, where in sorted(graph[a].items()):
            if b in inside:
                lines.append(f"  {a} -> {b}  ({', '.join(where)})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    package = Path(argv[0]).resolve() if argv else PACKAGE
    graph = import_graph(package)
    found = cycles(graph)
    for component in found:
        print(describe(graph, component))
    if not found:
        print(f"no import cycle in {package.name}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
