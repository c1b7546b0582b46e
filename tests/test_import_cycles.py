"""The `cachedit` package's modules import each other without cycles.

A cycle works in Python only as long as nobody reorders an import, and it is usually dodged with an
import moved into a function; so both kinds count here: imports at module level (run at import time,
including class bodies; `if TYPE_CHECKING:` blocks excluded) and imports inside functions (run later).
The graph is built from the source (ast), so the test imports nothing of cachedit.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "cachedit"


def _module_name(path: Path) -> str:
    parts = ("cachedit", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """(node, deferred) for every import statement; deferred: inside a function body."""
    found = []

    def visit(node, deferred):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit_stmt(sub, deferred)
                continue
            visit_stmt(child, deferred)

    def visit_stmt(child, deferred):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            found.append((child, deferred))
        visit(child, deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def import_graph() -> dict[str, dict[str, set[str]]]:
    """module -> {"top": modules imported at import time, "deferred": modules imported inside functions}."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = {"top": set(), "deferred": set()}
        for node, deferred in _imports(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                for alias in node.names:  # `from pkg import mod` imports the submodule pkg.mod
                    targets.append(f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in files else stem)
            for target in targets:
                while target and target not in files:  # `import cachedit.x.y` where y is a name: its module
                    target = target.rpartition(".")[0]
                if target.startswith("cachedit") and target != name:
                    edges["deferred" if deferred else "top"].add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_graph_is_read():
    graph = import_graph()
    assert "cachedit.api" in graph and "cachedit.config" in graph["cachedit.api"]["top"], graph["cachedit.api"]
    # a known deferred import (the plugin manager, loaded on first use) is seen as one
    assert any("cachedit.plugins" in e["deferred"] for e in graph.values())


def test_no_cycle_among_module_level_imports():
    graph = import_graph()
    assert cycles({m: e["top"] for m, e in graph.items()}) == []


def test_no_cycle_even_through_imports_inside_functions():
    graph = import_graph()
    assert cycles({m: e["top"] | e["deferred"] for m, e in graph.items()}) == []


def test_a_cycle_is_found():  # the checker itself: a two-module cycle and a three-module one
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(cycles(graph)) == [["a", "b"], ["c", "d", "e"]]


def test_parallel_plans_never_ask_the_plugin_manager():
    """Communicators come from the feature context's factory: no module under parallel/ imports plugins."""
    graph = import_graph()
    asking = [m for m, e in graph.items() if m.startswith("cachedit.parallel")
              and "cachedit.plugins" in e["top"] | e["deferred"]]
    assert asking == []
