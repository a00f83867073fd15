"""The package's layers point one way, and no module imports itself through others.

Every import counts, the function-local ones too (a local import must not hide a cycle or a
climb). Run it alone to see the import graph's layer check:

    python -m pytest tests/test_layers.py -q
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import lungbench

PACKAGE = Path(lungbench.__file__).parent

# Lower number = lower layer. A module may import its own layer and the layers below it.
LAYERS = {
    "lungbench": 0,  # the version string only
    "lungbench.core": 1,  # errors, device helpers, run folders, safe paths, environment
    "lungbench.distributed": 2,  # launch detection, process group
    "lungbench.data": 3,  # stores, readers, generators, cube geometry, the production loader
    "lungbench.models": 4,  # architectures and their registry
    "lungbench.step": 5,  # the speed switches and the one training step
    "lungbench.measure": 6,  # timing, statistics, sweep, DDP, ablation, profiler, ...
    "lungbench.train": 7,  # the training engine and what it needs
    "lungbench.report": 8,  # tables, plots, HTML report, compare
    "lungbench.experiments": 9,  # the recipes: speed-up run, training twins of the seeds
    "lungbench.commands": 10,  # one module per CLI command
    "lungbench.cli": 11,
    "lungbench.__main__": 11,
}

# Imports known to climb, kept as a list so a future exception is said out loud; empty since
# the training recipes stopped declaring argparse options (issue "One spine", item 4).
KNOWN_CLIMBS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Every lungbench module that `name` imports, at module level or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)  # a submodule by name
    return {m for m in found if m in known and m != name}


def layer_of(module: str) -> int:
    owner = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[owner]


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {n: imported_modules(n, p, set(modules)) for n, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def climbs(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a)}


def test_every_module_has_a_layer():
    for name in all_modules():
        assert layer_of(name) >= 0, name


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_experiments_neither_parse_options_nor_print():
    """Recipes take configs and return results; the commands own argparse and stdout."""
    for path in sorted((PACKAGE / "experiments").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        } | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        calls = {
            n.func.id
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        }
        assert "argparse" not in imported, path.name
        assert "print" not in calls, path.name


def test_layers_point_one_way():
    found = climbs(import_graph())
    assert found - KNOWN_CLIMBS == set(), "imports from a lower layer to a higher one"
    assert KNOWN_CLIMBS - found == set(), "fixed: remove these from KNOWN_CLIMBS"


def test_checker_sees_local_imports_and_cycles(tmp_path):
    """The checker itself: a function-local import and a two-module cycle are found."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from lungbench.cli import main\n")
    assert imported_modules("lungbench.core.a", a, {"lungbench.cli"}) == {"lungbench.cli"}
    assert climbs({"lungbench.core.a": {"lungbench.cli"}, "lungbench.cli": set()})
    assert cycles({"x": {"y"}, "y": {"x"}, "z": set()}) == [["x", "y"]]


@pytest.mark.parametrize("module", sorted(all_modules()))
def test_every_module_docstring_names_its_layer(module):
    """The first words of each module's docstring say its layer (a newcomer reads it there)."""
    doc = ast.get_docstring(ast.parse(all_modules()[module].read_text())) or ""
    assert doc.startswith(f"Layer {layer_of(module)}"), f"{module}: {doc[:60]!r}"


def report() -> str:  # pragma: no cover - a reading aid for the closing note
    graph = import_graph()
    by_layer = defaultdict(list)
    for name in graph:
        by_layer[layer_of(name)].append(name)
    lines = [f"{len(graph)} modules, {sum(map(len, graph.values()))} imports"]
    lines += [f"cycles: {cycles(graph) or 'none'}", f"climbs: {sorted(climbs(graph)) or 'none'}"]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(report())
