"""The package's layers point one way: no import cycles, and the lower layers never import the
upper ones.

The import graph is read from the source with `ast` (nothing is imported), counting every
import statement of a module wherever it is: at module level, inside functions, under `if`.
An edge A -> B means that module A names module B in an import:

    import ctl_jax.x.y              A -> ctl_jax.x.y
    from ctl_jax.x import y         A -> ctl_jax.x.y when x/y is a module, else A -> ctl_jax.x
    from . import y, from .m import z   resolved against A's package, the same way

Importing a submodule also runs its parent packages' `__init__` first. That is NOT an edge:
Python puts a package in `sys.modules` before running its `__init__`, so a submodule can be
imported while its package is still initialising (e.g. `ctl_jax/evaluation/__init__.py`
imports `protocol`, which imports `ctl_jax.evaluation.ranking`: fine). What does break is
taking a *name* from an `__init__` that has not finished, `from ctl_jax.evaluation import
MODES` in a module that `evaluation/__init__.py` itself imports; that statement is an edge to
the package (`ctl_jax.evaluation`), so such a cycle is reported. Counting the implicit
parent edges instead would report every package whose `__init__` re-exports its submodules.

Layers (lowest first): errors, files, configs, malloc, parallel (device mesh) | data, models,
losses, margin_losses, evaluation (metrics) | checkpoints | inference, weights (conversion) |
evaluator, retrieval | training | cli, distributed (start-up helpers) and the entry points
(train, evaluate, embed, search, convert, whiten, export, serve). The rules checked:

1. No cycles between modules.
2. No cycles between the top-level parts of the package (`ctl_jax.training`,
   `ctl_jax.inference`, ...): a part that imports another is above it.
3. Only `ctl_jax/training/` itself and its entry point `ctl_jax.train` import
   `ctl_jax.training`; in particular retrieval/, evaluation/, inference, evaluator, data/,
   models/, losses, checkpoints/, parallel and the other entry points do not.
4. models/ imports nothing from cpu/ (trivially true while there is no ctl_jax/cpu/).
5. No module imports an entry point (each defines command-line flags at import).
"""

from __future__ import annotations

import ast
import collections
import pathlib

import pytest

PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1] / "ctl_jax"
ENTRY_POINTS = tuple(
    f"ctl_jax.{name}"
    for name in ("train", "evaluate", "embed", "search", "convert", "whiten", "export", "serve")
)
BELOW_TRAINING = tuple(
    f"ctl_jax.{name}"
    for name in (
        "retrieval",
        "evaluation",
        "inference",
        "evaluator",
        "data",
        "models",
        "losses",
        "margin_losses",
        "checkpoints",
        "parallel",
    )
)

Edge = collections.namedtuple("Edge", "source target line")


def _module_names(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """{dotted module name: file} of every module of the package at `root`."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph(root: pathlib.Path) -> dict[str, list[Edge]]:
    """{module: [edges to modules of the same package]} of the package at `root`."""
    modules = _module_names(root)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        edges = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.append(submodule if submodule in modules else base)
            edges += [Edge(name, t, node.lineno) for t in targets if t in modules and t != name]
        graph[name] = edges
    return graph


def _strongly_connected(nodes, successors) -> list[list[str]]:
    """Tarjan's algorithm; the components with more than one node (the cycles)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in successors(v):
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

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return found


def _describe_cycle(component, graph) -> str:
    """One concrete cycle through the component, with file lines: 'a:12 -> b:40 -> a'."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    lines = []
    while True:
        edge = next(e for e in graph[path[-1]] if e.target in members)
        lines.append(edge.line)
        if edge.target in seen:
            cut = path.index(edge.target)
            hops = [f"{m}:{line}" for m, line in zip(path[cut:], lines[cut:])]
            return " -> ".join(hops + [edge.target])
        path.append(edge.target)
        seen.add(edge.target)


def module_cycles(graph) -> list[str]:
    successors = lambda v: sorted({e.target for e in graph[v]})
    return [_describe_cycle(c, graph) for c in _strongly_connected(graph, successors)]


def _part(module: str) -> str:
    """The top-level part a module belongs to: ctl_jax.training.loop -> ctl_jax.training."""
    return ".".join(module.split(".")[:2])


def part_cycles(graph) -> list[str]:
    parts = collections.defaultdict(set)
    for edges in graph.values():
        for e in edges:
            if _part(e.source) != _part(e.target):
                parts[_part(e.source)].add((_part(e.target), e.source, e.target, e.line))
    nodes = {_part(m) for m in graph}
    components = _strongly_connected(nodes, lambda v: sorted({t for t, *_ in parts[v]}))
    found = []
    for component in components:
        inside = sorted(
            f"{s}:{line} -> {t}"
            for p in component
            for target_part, s, t, line in parts[p]
            if target_part in component
        )
        found.append(f"{' <-> '.join(component)}: {'; '.join(inside)}")
    return found


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer_violations(graph) -> list[str]:
    found = []
    for edges in graph.values():
        for e in edges:
            where = f"{e.source}:{e.line} imports {e.target}"
            if _within(e.target, ["ctl_jax.training"]) and not _within(
                e.source, ["ctl_jax.training", "ctl_jax.train"]
            ):
                found.append(f"{where}: only training/ and ctl_jax.train import training/")
            if _within(e.source, ["ctl_jax.models"]) and _within(e.target, ["ctl_jax.cpu"]):
                found.append(f"{where}: models/ must not depend on cpu/")
            if _within(e.target, ENTRY_POINTS):
                found.append(f"{where}: {e.target} is an entry point (defines flags)")
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGE_DIR)


def test_no_import_cycles_between_modules(graph):
    cycles = module_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_package_parts_point_one_way(graph):
    cycles = part_cycles(graph)
    assert not cycles, "parts of ctl_jax that import each other:\n" + "\n".join(cycles)


def test_layers(graph):
    # The rules name real modules (all but cpu/, which may not exist yet).
    for name in (*BELOW_TRAINING, *ENTRY_POINTS, "ctl_jax.training"):
        assert any(_within(m, [name]) for m in graph), f"{name} not found"
    violations = layer_violations(graph)
    assert not violations, "layering violations:\n" + "\n".join(violations)


# --- the checker itself, on a small package ---------------------------------------------


def _write_package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        path = root / "ctl_jax" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "ctl_jax"


def test_checker_finds_function_level_and_submodule_cycles(tmp_path):
    package = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "def f():\n    from ctl_jax.sub import b\n",
            "sub/__init__.py": "",
            "sub/b.py": "import numpy\nfrom ctl_jax import a\n",
            "c.py": "from .sub import b as _b\n",
        },
    )
    graph = import_graph(package)
    assert {e.target for e in graph["ctl_jax.a"]} == {"ctl_jax.sub.b"}
    assert {e.target for e in graph["ctl_jax.sub.b"]} == {"ctl_jax.a"}
    assert {e.target for e in graph["ctl_jax.c"]} == {"ctl_jax.sub.b"}
    assert module_cycles(graph) == ["ctl_jax.a:2 -> ctl_jax.sub.b:2 -> ctl_jax.a"]
    assert len(part_cycles(graph)) == 1


def test_checker_counts_names_from_a_package_but_not_its_implicit_init(tmp_path):
    files = {
        "__init__.py": "",
        "pkg/__init__.py": "from ctl_jax.pkg.x import NAME\nfrom ctl_jax.pkg.y import OTHER\n",
        "pkg/x.py": "NAME = 1\n",
        # A submodule import (fine even while pkg/__init__ runs): no cycle.
        "pkg/y.py": "import ctl_jax.pkg.x\nOTHER = 2\n",
    }
    assert module_cycles(import_graph(_write_package(tmp_path / "ok", files))) == []
    # A name taken from the unfinished __init__: a real cycle.
    files["pkg/y.py"] = "from ctl_jax.pkg import NAME\nOTHER = NAME\n"
    cycles = module_cycles(import_graph(_write_package(tmp_path / "bad", files)))
    assert cycles == ["ctl_jax.pkg:2 -> ctl_jax.pkg.y:1 -> ctl_jax.pkg"]


def test_checker_layer_rules(tmp_path):
    package = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "train.py": "from ctl_jax.training import loop\n",
            "training/__init__.py": "",
            "training/loop.py": "",
            "inference.py": "def f():\n    from ctl_jax.training import loop\n",
            "models/__init__.py": "from ctl_jax.cpu import ops\n",
            "cpu/__init__.py": "",
            "cpu/ops.py": "",
            "search.py": "from ctl_jax import train\n",
        },
    )
    violations = layer_violations(import_graph(package))
    assert len(violations) == 3
    assert violations[0].startswith("ctl_jax.inference:2 imports ctl_jax.training.loop")
    assert "models/ must not depend on cpu/" in violations[1]
    assert "ctl_jax.train is an entry point" in violations[2]
