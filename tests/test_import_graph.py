"""The import graph of the repository's packages has no cycle.

The graph is read from the source with :mod:`ast` (nothing is imported, so the test is fast and needs no JAX). A node
is a module (``pkg/__init__.py`` is ``pkg``); an edge ``a -> b`` means that ``a`` imports ``b``, through an absolute or
a relative ``import`` / ``from ... import``. ``from pkg import name`` points at the submodule ``pkg.name`` when that
module exists and at ``pkg`` otherwise. Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``; those
implicit edges are left out (every submodule would otherwise form a cycle with a package ``__init__`` that re-exports
it), as import linters do.

Two kinds of edges are told apart:

* *module-level* imports run when the module is imported: a cycle among them makes the import order matter;
* *deferred* imports sit inside a function (or under ``if TYPE_CHECKING:``) and run later. Moving an import into a
  function is how a cycle is usually hidden, so deferred edges count too, and each reported cycle marks them.
  Imports by name are deferred edges as well: in a module that calls ``importlib.import_module`` (or ``__import__``),
  every string constant that names a scanned module (``"pkg.mod"`` or ``"pkg.mod:attr"``) counts as an import of it.
"""

from __future__ import annotations

import ast
import functools
import pathlib
from collections.abc import Iterable

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("canon_jax", "pallas_kernels", "experiments")

Edge = tuple[str, str, str, int, str]  # (importer, imported, file, line, kind)
MODULE_LEVEL, DEFERRED, BY_NAME = (
    "module level",
    "deferred (in a function or TYPE_CHECKING block)",
    "by name (importlib)",
)


def _module_names(root: pathlib.Path, packages: Iterable[str]) -> dict[str, pathlib.Path]:
    modules = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Yields every import statement with ``deferred`` = inside a function or an ``if TYPE_CHECKING:`` block."""

    def visit(node: ast.AST, deferred: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, deferred
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from visit(child, True)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from visit(ast.Module(body=[stmt], type_ignores=[]), True)
                for stmt in child.orelse:
                    yield from visit(ast.Module(body=[stmt], type_ignores=[]), deferred)
            else:
                yield from visit(child, deferred)

    yield from visit(tree, False)


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str | None:
    """The longest prefix of the dotted ``name`` that is one of ``modules`` (None outside the scanned packages)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_edges(root: pathlib.Path, packages: Iterable[str]) -> tuple[set[str], list[Edge]]:
    modules = _module_names(root, packages)
    edges = []
    for mod, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = str(path.relative_to(root))
        for node, deferred in _imports(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = mod.split(".") if is_package else mod.split(".")[:-1]
                    if node.level - 1 > len(base):
                        raise ValueError(f"{rel}:{node.lineno}: relative import beyond the top-level package")
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module
                for alias in node.names:
                    sub = f"{prefix}.{alias.name}"
                    targets.append(sub if sub in modules else prefix)
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != mod:
                    edges.append((mod, resolved, rel, node.lineno, DEFERRED if deferred else MODULE_LEVEL))
        if _imports_by_name(tree):
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    name = node.value.split(":")[0]
                    if name in modules and name != mod:
                        edges.append((mod, name, rel, node.lineno, BY_NAME))
    return set(modules), sorted(set(edges))


def _imports_by_name(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
                isinstance(f, ast.Name) and f.id in ("import_module", "__import__")
            ):
                return True
    return False


def _strongly_connected(nodes: set[str], adjacency: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns the components with more than one module."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(adjacency.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(adjacency.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return sorted(out)


def _shortest_cycle(component: list[str], adjacency: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first search inside the component)."""
    members, start = set(component), component[0]
    parent = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(adjacency.get(node, ()) & members):
                if child == start:
                    path = [node]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in the component {component}")


def find_cycles(nodes: set[str], edges: list[Edge], *, include_deferred: bool) -> list[str]:
    """One readable report per cycle (a strongly connected component): a shortest cycle and the edges inside it."""
    used = [e for e in edges if include_deferred or e[4] == MODULE_LEVEL]
    adjacency: dict[str, set[str]] = {}
    for a, b, *_ in used:
        adjacency.setdefault(a, set()).add(b)
    reports = []
    for component in _strongly_connected(nodes, adjacency):
        cycle = _shortest_cycle(component, adjacency)
        members = set(component)
        lines = [" -> ".join(cycle)]
        for a, b, file, line, kind in used:
            if a in members and b in members:
                lines.append(f"    {a} -> {b}  [{file}:{line}, {kind}]")
        reports.append("\n".join(lines))
    return reports


@functools.cache
def _repository_graph() -> tuple[set[str], list[Edge]]:
    return import_edges(ROOT, PACKAGES)


def _check(include_deferred: bool):
    nodes, edges = _repository_graph()
    assert len(nodes) > 50, f"the scan found only {len(nodes)} modules under {ROOT}"
    cycles = find_cycles(nodes, edges, include_deferred=include_deferred)
    what = "imports, counting deferred and by-name ones," if include_deferred else "module-level imports"
    assert not cycles, f"{len(cycles)} import cycle(s) among {what} of {', '.join(PACKAGES)}:\n" + "\n".join(cycles)


def test_no_cycle_among_module_level_imports():
    _check(include_deferred=False)


def test_no_cycle_even_through_deferred_imports():
    """A cycle closed only by an import inside a function (or by name) is hidden from the interpreter, not removed."""
    _check(include_deferred=True)


# ---------------------------------------------------------------------------------------------------------------------
# The checker itself, on a small package written for the test.


def _write(root: pathlib.Path, files: dict[str, str]):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def toy(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.a import f\n",
            "pkg/a.py": "from . import b\nimport os\n",
            "pkg/b.py": "from pkg.sub import c\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "from ..a import f\nfrom .d import g\n",
            "pkg/sub/d.py": "def g():\n    from pkg.sub import c\n",
            "pkg/e.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.f\nelse:\n    import pkg.sub.d\n"
            ),
            "pkg/f.py": "import pkg.e as e\n",
            "pkg/g.py": (
                'import importlib\nTABLE = {"x": "pkg.h:H"}\n\ndef get():\n    return importlib.import_module("os")\n'
            ),
            "pkg/h.py": "from pkg import g\nH = 1\n",
        },
    )
    return tmp_path


def test_edges_resolve_absolute_relative_and_deferred_imports(toy):
    nodes, edges = import_edges(toy, ["pkg"])
    assert nodes == {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.sub.d", "pkg.e", "pkg.f", "pkg.g", "pkg.h"}
    got = {(a, b, kind) for a, b, _, _, kind in edges}
    assert got == {
        ("pkg", "pkg.a", MODULE_LEVEL),
        ("pkg.a", "pkg.b", MODULE_LEVEL),
        ("pkg.b", "pkg.sub.c", MODULE_LEVEL),
        ("pkg.sub.c", "pkg.a", MODULE_LEVEL),
        ("pkg.sub.c", "pkg.sub.d", MODULE_LEVEL),
        ("pkg.sub.d", "pkg.sub.c", DEFERRED),
        ("pkg.e", "pkg.f", DEFERRED),
        ("pkg.e", "pkg.sub.d", MODULE_LEVEL),
        ("pkg.f", "pkg.e", MODULE_LEVEL),
        ("pkg.g", "pkg.h", BY_NAME),
        ("pkg.h", "pkg.g", MODULE_LEVEL),
    }


def test_cycles_are_found_and_deferred_edges_marked(toy):
    nodes, edges = import_edges(toy, ["pkg"])
    eager = find_cycles(nodes, edges, include_deferred=False)
    assert len(eager) == 1 and eager[0].splitlines()[0] == "pkg.a -> pkg.b -> pkg.sub.c -> pkg.a"
    every = find_cycles(nodes, edges, include_deferred=True)
    assert len(every) == 3
    first, second, third = every
    assert first.splitlines()[0] == "pkg.a -> pkg.b -> pkg.sub.c -> pkg.a"
    assert "pkg.sub.d -> pkg.sub.c  [pkg/sub/d.py:2, deferred (in a function or TYPE_CHECKING block)]" in first
    assert second.splitlines()[0] == "pkg.e -> pkg.f -> pkg.e"
    assert "pkg.e -> pkg.f  [pkg/e.py:3, deferred (in a function or TYPE_CHECKING block)]" in second
    assert third.splitlines()[0] == "pkg.g -> pkg.h -> pkg.g"
    assert "pkg.g -> pkg.h  [pkg/g.py:2, by name (importlib)]" in third
