"""The public API: every name ``fintensor`` exports resolves, and type checkers see each one's real object."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import fintensor as ft

INIT = Path(ft.__file__)


def type_checking_names() -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(INIT.read_text())):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in ast.walk(node):
                if isinstance(imp, ast.ImportFrom):
                    names |= {a.asname or a.name for a in imp.names}
    return names


def test_every_public_name_resolves_lazily_to_a_real_object():
    for name in ft.__all__:
        value = getattr(ft, name)
        assert value is not None, name
        assert inspect.ismodule(value) or callable(value), name


def test_type_checkers_see_exactly_the_public_names():
    assert type_checking_names() == set(ft.__all__)


def test_train_config_and_the_trainer_agree():
    assert ft.TrainConfig is __import__("fintensor.trainer", fromlist=["TrainConfig"]).TrainConfig
    assert "segment" in inspect.signature(ft.evaluate).parameters
