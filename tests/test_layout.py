"""The package's layout is its pipeline: every import (module level or inside a function) goes down the layer
order documented in CONTRIBUTING.md, and the import graph of the modules has no cycle."""

import ast
import tomllib
from pathlib import Path

import networkx as nx

import bsdgraph

ROOT = Path(bsdgraph.__file__).parent

# Lowest first; a module may import its own layer and the layers before it. The top-level ``bsdgraph/__init__.py``
# (the public API) sits above every layer but cli, and only cli's entry point imports it.
LAYERS = ["base", "ir", "compiler", "runtime", "train", "parallel", "interop", "tools", "api", "cli"]
BASE = {"bsdgraph.errors", "bsdgraph.env", "bsdgraph.registry", "bsdgraph.version"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    if module == "bsdgraph":
        return "api"
    if module == "bsdgraph.__main__":
        return "cli"
    return module.split(".")[1]


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every bsdgraph module ``path`` imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("bsdgraph")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bsdgraph"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs or {node.module}
    return out


def graph() -> nx.DiGraph:
    mods = modules()
    g = nx.DiGraph()
    for mod, path in mods.items():
        g.add_node(mod)
        for dep in imports(path, set(mods)):
            if dep != mod:
                g.add_edge(mod, dep)
    return g


def test_every_module_sits_in_a_known_layer():
    unknown = sorted(m for m in modules() if layer(m) not in LAYERS)
    assert not unknown, f"modules outside the documented layers: {unknown}"


def test_imports_only_go_down_the_layers():
    upward = sorted(f"{a} -> {b}" for a, b in graph().edges if LAYERS.index(layer(b)) > LAYERS.index(layer(a)))
    assert not upward, "imports up the pipeline:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    cycles = list(nx.simple_cycles(graph()))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_the_layer_check_sees_function_level_imports(tmp_path):
    """The checker must not miss an import written inside a function (how the old ir -> validate cycle hid)."""
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from bsdgraph.cli.main import main\n")
    assert imports(mod, set(modules())) == {"bsdgraph.cli.main"}


def test_version_matches_pyproject():
    meta = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
    assert bsdgraph.__version__ == meta["project"]["version"]
