"""The store's modules import only downward: the vocabulary (schema), file I/O and errors import nothing of
fintensor above them, and no store module imports the tensor, compute, training or CLI layers."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fintensor"
ALLOWED = {
    "errors": set(),
    "schema": {"errors"},
    "fileio": {"errors"},
    "store_rows": {"errors", "schema"},
    "store_checks": {"errors", "fileio", "schema", "store_rows"},
    "store_verify": {"errors", "fileio", "schema", "store_checks"},
    "store": {"calendars", "errors", "fileio", "schema", "store_checks", "store_rows", "store_verify", "symbols"},
}


def fintensor_imports(module: str) -> set[str]:
    """Every fintensor module ``module`` imports, at any depth of its code (lazy imports count too),
    except under ``if TYPE_CHECKING:``."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom) or node.level != 1:
            continue
        out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return out


def test_store_modules_import_only_downward():
    found = {m: fintensor_imports(m) for m in ALLOWED}
    assert {m: deps - ALLOWED[m] for m, deps in found.items() if deps - ALLOWED[m]} == {}
    # and the allowed graph itself has no cycle
    seen, order = set(), []

    def visit(m, path=()):
        assert m not in path, f"import cycle {' -> '.join(path + (m,))}"
        if m in seen or m not in ALLOWED:
            return
        for d in found[m]:
            visit(d, path + (m,))
        seen.add(m)

    for m in ALLOWED:
        visit(m)
