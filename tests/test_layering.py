"""Dependencies point one way: core -> methods -> API -> evals -> CLI and benchmarks.

The floor of a file is its folder: the modules directly in ``edit/`` (but the front door,
``__init__`` and ``__main__``) and the packages ``edit/ledger`` and ``edit/readers`` are the
core; ``methods/`` (causal tracing included)
the methods; ``edit/api`` the API; ``evals/`` the evals; ``edit/cli`` the CLI. Every file
of the package has a floor, and imports nothing from a floor above its own. The test reads
each file's imports (lazy ones inside functions included), so an added forbidden import, or
a new folder that is not given a floor, fails it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# floor -> (its folders, relative to the repository; the import names of the floors above)
FLOORS = {
    "core": (["edit", "edit/ledger", "edit/readers"],
             ("edit.methods", "edit.api", "edit.evals", "edit.cli")),
    "methods": (["methods"], ("edit.api", "edit.evals", "edit.cli")),
    "api": (["edit/api"], ("edit.evals", "edit.cli")),
    "evals": (["evals"], ("edit.cli",)),
    "cli": (["edit/cli"], ()),
}  # fmt: skip
PACKAGE_ROOTS = ["edit", "methods", "evals", "configs"]  # what installs as edit.*
# the package's front door names every floor (``import edit`` loads them on first use)
DOORS = ("edit/__init__.py", "edit/__main__.py")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _forbidden(path: Path, above: tuple[str, ...]) -> list[str]:
    return sorted(n for n in _imports(path) if above and n.startswith(above))


def floor_of(path: Path) -> str | None:
    """The floor of a file: the one whose folder holds it most closely (a subfolder that
    is not named belongs to no floor)."""
    if path.relative_to(ROOT).as_posix() in DOORS:
        return "door"
    folder = path.parent.relative_to(ROOT).as_posix()
    for floor, (folders, _) in FLOORS.items():
        if folder in folders:
            return floor
    for floor, (folders, _) in FLOORS.items():  # methods/ and evals/ include their subfolders
        if floor in ("methods", "evals") and any(folder.startswith(f + "/") for f in folders):
            return floor
    return None


def _package_files() -> list[Path]:
    return sorted(p for r in PACKAGE_ROOTS for p in (ROOT / r).rglob("*.py")
                  if "__pycache__" not in p.parts)  # fmt: skip


def test_every_file_of_the_package_has_a_floor():
    homeless = [p.relative_to(ROOT).as_posix() for p in _package_files() if p.parent.name !=
                "configs" and floor_of(p) is None]  # fmt: skip
    assert homeless == [], f"give these folders a floor in FLOORS: {homeless}"


@pytest.mark.parametrize("path", _package_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_imports_from_a_floor_above_its_own(path):
    floor = floor_of(path)
    if floor in (None, "door"):
        pytest.skip("the front door, or configs (data, no code)")
    assert _forbidden(path, FLOORS[floor][1]) == [], f"{path.relative_to(ROOT)} is {floor}"


def test_the_floors_are_the_folders():
    def rel(p: str) -> Path:
        return ROOT / p / "x.py"

    assert floor_of(rel("edit")) == "core" and floor_of(rel("edit/ledger")) == "core"
    assert floor_of(rel("methods/locate")) == "methods" and floor_of(rel("edit/api")) == "api"
    assert floor_of(rel("evals")) == "evals" and floor_of(rel("edit/cli")) == "cli"
    assert floor_of(rel("edit/newfolder")) is None


def test_the_check_fails_on_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from edit.evals.harness import evaluate\n")
    assert _forbidden(bad, FLOORS["methods"][1]) == [
        "edit.evals.harness",
        "edit.evals.harness.evaluate",
    ]


def test_importing_the_core_loads_no_api_or_method():
    """``edit/__init__.py`` is lazy: a core module imports without the API above it, and
    the package's names still resolve on first use."""
    code = (
        "import sys, edit.lm, edit.facts\n"
        "above = sorted(m for m in sys.modules if m.startswith(('edit.api', 'edit.methods',"
        " 'edit.evals', 'edit.cli')))\n"
        "assert above == [], above\n"
        "import edit\n"
        "assert edit.apply.__module__ == 'edit.api.edits' and edit.arch.__name__ == 'edit.arch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
