"""Field docstrings stay on their fields: one string under each documented field, naming the variable that sets it."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "include" / "nightshift"
MODULES = ["settings.py", "prep/recipe.py", "prep/step_base.py", "prep/filters.py", "prep/language.py",
           "prep/pii.py", "prep/decontaminate.py", "prep/shard_worker.py"]


@pytest.mark.parametrize("module", MODULES)
def test_no_string_floats_under_another_string(module):
    """Two docstrings in a row mean one of them lost its field (or constant)."""
    tree = ast.parse((PACKAGE / module).read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for first, second in zip(body, body[1:], strict=False):
            strings = [isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                       for n in (first, second)]
            assert not all(strings), f"{module}:{second.lineno}: a string under a string"


def test_a_settings_field_that_names_its_variable_is_set_from_that_variable():
    tree = ast.parse((PACKAGE / "settings.py").read_text())
    documented: dict[str, set[str]] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for field, doc in zip(cls.body, cls.body[1:], strict=False):
            if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
                named = set(re.findall(r"\(([A-Z][A-Z0-9_]+)[);,]", str(doc.value.value)))
                if named:
                    documented[field.target.id] = named
    read: dict[str, set[str]] = {}
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        for keyword in call.keywords:
            if keyword.arg:
                names = {c.value for c in ast.walk(keyword.value) if isinstance(c, ast.Constant)
                         and isinstance(c.value, str) and re.fullmatch(r"[A-Z][A-Z0-9_]+", c.value)}
                read.setdefault(keyword.arg, set()).update(names)
    assert documented, "no documented variables found: the test reads nothing"
    for field, names in documented.items():
        assert names <= read.get(field, set()), (field, names, read.get(field))
