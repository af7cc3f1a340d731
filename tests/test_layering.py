"""Dependencies point one way: core -> methods -> API -> evals -> CLI and benchmarks.

The core modules import no method, eval, API, locate or CLI code; methods import no API,
eval or CLI code; the API imports no eval or CLI code; evals import no CLI code. The test
reads each file's imports (lazy ones inside functions included), so an added forbidden
import fails it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ["arch", "atomic", "cache", "config", "corpus", "distributed", "errors", "facts",
        "hooks", "layers", "ledger", "lm", "lock", "models", "placement", "quantize", "questions",
        "readers", "stats", "update"]  # fmt: skip
CLI = ("edit.cli",)
EVALS = ("edit.evals", *CLI)
API = ("edit.api", "edit.workspace", *EVALS)
METHODS = ("edit.methods", "edit.locate", *API)


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
    return sorted(n for n in _imports(path) if n.startswith(above))


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("module", CORE)
def test_core_modules_import_nothing_above_them(module):
    folder = ROOT / "edit" / module  # a core package: every file of it
    paths = sorted(folder.rglob("*.py")) if folder.is_dir() else [ROOT / "edit" / f"{module}.py"]
    for path in paths:
        found = _forbidden(path, METHODS)
        assert found == [], f"{path.relative_to(ROOT)} imports {found}, above the core"


@pytest.mark.parametrize("path", _files("methods"), ids=lambda p: str(p.relative_to(ROOT)))
def test_methods_import_no_api_eval_or_cli(path):
    assert _forbidden(path, API) == []


@pytest.mark.parametrize("name", ["api", "workspace"])
def test_the_api_imports_no_eval_or_cli(name):
    assert _forbidden(ROOT / "edit" / f"{name}.py", EVALS) == []


@pytest.mark.parametrize("path", _files("evals"), ids=lambda p: str(p.relative_to(ROOT)))
def test_evals_import_no_cli(path):
    assert _forbidden(path, CLI) == []


def test_the_check_fails_on_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from edit.evals.harness import evaluate\n")
    assert _forbidden(bad, METHODS) == ["edit.evals.harness", "edit.evals.harness.evaluate"]


def test_importing_the_core_loads_no_api_or_method():
    """``edit/__init__.py`` is lazy: a core module imports without the API above it, and
    the package's names still resolve on first use."""
    code = (
        "import sys, edit.lm, edit.facts\n"
        "above = sorted(m for m in sys.modules if m.startswith(('edit.api', 'edit.workspace',"
        " 'edit.methods', 'edit.evals', 'edit.cli')))\n"
        "assert above == [], above\n"
        "import edit\n"
        "assert edit.apply.__module__ == 'edit.api' and edit.arch.__name__ == 'edit.arch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
