"""``pallas_kernels`` and ``canon_jax.ops`` import without cycles: a graph of the module-level imports (what runs at
import time), read from the source with ``ast``."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("pallas_kernels", "canon_jax/ops")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _top_level_imports(tree: ast.Module, name: str, is_pkg: bool):
    """Modules named by the import statements that run when the module is imported (not inside functions)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)
        else:
            stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        own = {name.rsplit(".", i)[0] for i in range(name.count(".") + 1)}  # the module and its parent packages
        for target in _top_level_imports(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            # importing a.b.c runs a, a.b and a.b.c
            for i in range(target.count(".") + 1):
                mod = target.rsplit(".", i)[0]
                if mod in modules and mod not in own:
                    deps.add(mod)
        graph[name] = deps
    return graph


def find_cycle(graph: dict):
    """One cycle as a list of module names, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return path[path.index(dep) :] + [dep]
            if dep not in state:
                cycle = visit(dep, path + [dep])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def test_graph_sees_the_modules():
    graph = import_graph()
    assert "pallas_kernels.short_conv.api" in graph and "canon_jax.ops.conv" in graph
    assert "pallas_kernels.short_conv.api" in graph["canon_jax.ops.conv"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)
