"""The import graph follows the data flow: nothing imports upward, no cycles.

Every module of the package has a layer (the table below; a new module must be placed in it). A module may
import modules of its own layer or below, never above, and the graph (counting imports inside functions
too: a lazy import is still a dependency) has no cycle. The CLI layer's helpers are for cli and demo only.
The one sanctioned upward reference is ``builder.ENGINES`` (``engine="ray"`` names a module above the
builder, imported by name on demand); no other module imports by name.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fintensor"

# bottom to top; a prefix ending in "." covers a package's modules
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("checks", "fileio", "schema", "symbols"),
    ("calendars",),
    ("tensor",),
    ("ondisk",),
    ("store_rows", "store_checks", "store_verify", "store_remote"),
    ("store",),
    ("sources", "sources."),
    ("builder", "recipes"),
    ("rolling", "rolling."),
    ("features", "market"),
    ("data",),
    ("models",),
    ("metrics",),
    ("config", "checkpoint", "progress"),
    ("trainer", "cluster"),
    ("cli", "demo", "__main__"),
]
TOP = len(LAYERS) - 1
CLI_ONLY = {"cli"}  # imported only from the top layer


def layer(module: str) -> int:
    for rank, names in enumerate(LAYERS):
        for name in names:
            if module == name or (name.endswith(".") and module.startswith(name)):
                return rank
    raise AssertionError(f"fintensor.{module} has no layer: add it to LAYERS in {__file__}")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def imports(module: str, path: Path) -> set[str]:
    """The package modules ``module`` imports anywhere in its file (relative or absolute), except under
    ``if TYPE_CHECKING:``."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree)  # `if TYPE_CHECKING:` imports are for type checkers only
                 if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
                 for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "fintensor":
                target = node.module.removeprefix("fintensor").lstrip(".")
            else:
                continue
            names = [target] if node.module else [f"{target}.{a.name}".lstrip(".") for a in node.names]
            out.update(names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "fintensor":
                    out.add(a.name.removeprefix("fintensor").lstrip("."))
    known = modules()
    resolved = set()
    for name in out:  # "from . import rolling" names a module; "from .store import Store" names its module
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            resolved.add(name)
    return resolved


GRAPH = {m: imports(m, p) for m, p in modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_nothing_imports_upward(module):
    rank = layer(module)
    upward = sorted(t for t in GRAPH[module] if layer(t) > rank)
    assert not upward, f"fintensor.{module} (layer {rank}) imports {upward} from above it"


def test_no_cycles():
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_only_the_top_imports_the_cli():
    users = sorted(m for m, deps in GRAPH.items() if deps & CLI_ONLY and layer(m) != TOP)
    assert not users, f"{users} import the CLI layer; only {LAYERS[-1]} may"


def test_the_checker_sees_lazy_and_relative_imports():
    # the invariant holds only if the parser finds function-level and package-relative imports
    assert "store" in GRAPH["cli"]  # cli imports the store inside a function
    assert "builder" in GRAPH["recipes"]  # recipes imports the builder inside a function
    assert "errors" in GRAPH["symbols"]


def test_the_only_import_by_name_is_the_engine_registry():
    """builder.ENGINES names modules above features (they call build/compute in their tasks); nothing else
    in the package hides an import behind importlib."""
    from fintensor import builder

    for name in builder.ENGINES.values():
        assert layer(name.removeprefix("fintensor.")) > layer("features"), name
    by_name = sorted(m for m, path in modules().items() if "import_module(" in path.read_text())
    assert by_name == ["builder"]
