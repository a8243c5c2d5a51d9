"""No import cycle among the modules of supra/ and kernels/ (shipped as supra.kernels).

The graph is read from the source files with ast, without importing anything: an edge for every
import of a supra module, at the top of a file or inside a function (a deferred import still ties the
two modules together: the cycles this test was written against, kernels/hybrid.py with
triton_hybrid.py and with sparse_cache.py, went through such imports). `from .pkg import name` counts
as an import of pkg.name when that is a module, else of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"supra": ROOT / "supra", "supra.kernels": ROOT / "kernels"}


def module_files() -> dict[str, Path]:
    """{dotted module name: file} for every module of the two source trees."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "supra" and parts[0] == "export_template":  # a template copied into exports, not a module
                continue
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that the file imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            if node.level:
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import supra.kernels.hybrid` resolves; an outside one empties
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or around a loop (the strongly connected
    components of more than one module, Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def test_the_graph_sees_the_kernel_imports():
    """The resolution is right: relative, deferred and package-level imports all show up as edges."""
    graph = import_graph()
    assert {"supra.kernels.backend", "supra.kernels.hybrid"} <= graph["supra.kernels.dispatch"]
    assert "supra.kernels.triton_hybrid" in graph["supra.kernels.dispatch"]  # imported inside a function
    assert "supra.kernels" in graph["supra.layers.attention"]  # `from ..kernels import ...`


def test_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []
