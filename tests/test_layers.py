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
    "lungbench.switches": 5,  # the speed switches and how 'auto' resolves
    "lungbench.step": 5,  # the one training step
    "lungbench.measure": 6,  # primitives: timing, statistics, peaks, memory, contention, ...
    "lungbench.harness": 7,  # run modes: sweep, DDP, ablation, tuning, batch finder, profiler
    "lungbench.predict": 8,  # forecasting from a measured run
    "lungbench.train": 9,  # the training engine and what it needs
    "lungbench.report": 10,  # tables, plots, HTML report, compare
    "lungbench.experiments": 11,  # the recipes: speed-up run, training twins of the seeds
    "lungbench.commands": 12,  # one module per CLI command
    "lungbench.cli": 13,
    "lungbench.__main__": 13,
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
    """Each module falls under exactly one named layer (a new top-level room must be added to
    LAYERS, or it would silently take the root's layer 0)."""
    for name in all_modules():
        owners = [p for p in LAYERS if name == p or name.startswith(p + ".")]
        specific = [p for p in owners if p != "lungbench"]
        assert name in ("lungbench", "lungbench.py") or specific, f"{name}: no layer in LAYERS"


def test_a_module_outside_every_layer_is_caught():
    owners = [p for p in LAYERS if "lungbench.newroom.x".startswith(p + ".")]
    assert owners == ["lungbench"]  # only the root: test_every_module_has_a_layer fails it


COMMANDS_LAYER = LAYERS["lungbench.commands"]


def launches_lungbench(tree: ast.AST) -> bool:
    """True when the code builds an argv that starts `lungbench`: `[..., "-m", "lungbench",
    ...]` (python -m) or a list whose first item is "lungbench" (the console script)."""
    for node in ast.walk(tree):
        if not isinstance(node, (ast.List, ast.Tuple)):
            continue
        items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
        if items[:1] == ["lungbench"] or any(
            a == "-m" and b == "lungbench" for a, b in zip(items, items[1:], strict=False)
        ):
            return True
    return False


def test_only_the_commands_start_lungbench_processes():
    """A `lungbench` subprocess is a climb the import graph cannot see: a lower layer that
    started one would run the commands above it. Only the commands (and the cli) may."""
    starters = {
        name
        for name, path in all_modules().items()
        if layer_of(name) < COMMANDS_LAYER and launches_lungbench(ast.parse(path.read_text()))
    }
    assert starters == set()


def test_launch_checker_sees_both_spellings():
    assert launches_lungbench(ast.parse('argv = [sys.executable, "-m", "lungbench", "bench"]'))
    assert launches_lungbench(ast.parse('subprocess.run(["lungbench", "bench"])'))
    assert not launches_lungbench(ast.parse('logging.getLogger("lungbench")'))


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
