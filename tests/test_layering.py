"""Dependencies point one way: the core modules import no method, eval or CLI code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

EDIT = Path(__file__).resolve().parents[1] / "edit"
CORE = ["arch", "atomic", "cache", "corpus", "distributed", "errors", "hooks", "lm", "models",
        "placement", "readers", "stats", "update"]  # fmt: skip
ABOVE = ("edit.methods", "edit.evals", "edit.cli", "edit.api", "edit.workspace")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _files(module: str) -> list[Path]:
    """The file of a core module, or every file of a core package."""
    folder = EDIT / module
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [EDIT / f"{module}.py"]


@pytest.mark.parametrize("module", CORE)
def test_core_modules_import_nothing_above_them(module):
    for path in _files(module):
        above = sorted(n for n in _imports(path) if n.startswith(ABOVE))
        assert above == [], f"{path.relative_to(EDIT.parent)} imports {above}"
