"""The import graph is a stack: toolkit <- serve <- recipes; lightning/deepspeed only in recipes."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINING = {"lightning", "pytorch_lightning", "deepspeed"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def offenders(folder: str, forbidden_prefixes: set[str], skip: str | None = None) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if skip and rel.startswith(skip):
            continue
        for name in imported_modules(path):
            if any(name == p or name.startswith(p + ".") for p in forbidden_prefixes):
                bad.append(f"{rel} imports {name}")
    return bad


def test_toolkit_imports_neither_serve_nor_recipes_nor_training_frameworks():
    forbidden = {"slimlm.serve", "slimlm.recipes", "serve", "recipes"} | TRAINING
    assert offenders("toolkit", forbidden, skip="toolkit/integrations/") == []


def test_serve_imports_no_recipes_nor_training_frameworks():
    assert offenders("serve", {"slimlm.recipes", "recipes"} | TRAINING) == []


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom slimlm.recipes import cli\nimport deepspeed.comm\n")
    names = imported_modules(bad)
    assert {"slimlm.recipes", "deepspeed.comm"} <= names


@pytest.mark.parametrize("folder", ["toolkit", "serve", "recipes"])
def test_every_package_folder_has_an_init(folder):
    # setup.py maps folders with __init__.py into slimlm.*; a folder without one would not install.
    for sub in (ROOT / folder).rglob("*.py"):
        assert (sub.parent / "__init__.py").exists(), f"{sub.parent} has .py files but no __init__.py"
