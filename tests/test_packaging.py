"""The install says nothing a user must read: every folder that ships in the package is
declared as one (setuptools warns, once per folder, about an importable folder that
`packages` leaves out), and each maps to a folder that exists."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if sys.version_info < (3, 11):
    pytest.skip("tomllib needs Python 3.11", allow_module_level=True)
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SETUP = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _folder(package: str) -> Path:
    """Where a dotted package name lives, through `package-dir` (longest prefix wins)."""
    mapping = SETUP["package-dir"]
    prefix = max((p for p in mapping if package == p or package.startswith(p + ".")), key=len)
    rest = package[len(prefix) :].lstrip(".")
    return ROOT / mapping[prefix] / rest.replace(".", "/")


def _shipped() -> set[str]:
    """Every importable folder under the mapped roots that holds a file, as a dotted name."""
    found = set()
    for package, folder in SETUP["package-dir"].items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                parts = path.parent.relative_to(ROOT / folder).parts
                if all(p.isidentifier() for p in parts):
                    found.add(".".join((package, *parts)))
    return found


def test_every_shipped_folder_is_declared():
    missing = _shipped() - set(SETUP["packages"])
    assert missing == set(), f"add to [tool.setuptools] packages: {sorted(missing)}"


def test_every_declared_package_exists():
    assert [p for p in SETUP["packages"] if not _folder(p).is_dir()] == []


def test_every_package_data_pattern_matches_a_file():
    for package, patterns in SETUP["package-data"].items():
        for pattern in patterns:
            assert list(_folder(package).glob(pattern)), f"{package}: {pattern} matches nothing"
