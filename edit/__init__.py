"""edit: change what a causal language model knows.

import edit
model, tok = edit.load()                                   # embedded SmolLM2-135M
result = edit.apply(model, tok, "Paris is capital of Italy")  # ROME, in memory
print(edit.ask(model, tok, "Paris is the capital of which country?", chat=True))
result.undo()

ws = edit.Workspace.open("my-edits")                       # a ledger on disk
change = ws.add("Paris is capital of Italy")               # .entry, .result, .health
ws.revert(change.entry.id); ws.export("merged-model/")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# The names below load on first use, so that ``from edit import lm`` inside the core does
# not import the API (and every method) with it.
_LAZY = {
    "arch": None,  # the submodule itself
    "Change": "edit.api.workspace",
    "DEFAULT_MODEL": "edit.models",
    "EditError": "edit.errors",
    "EditFailed": "edit.errors",
    "EditResult": "edit.api.edits",
    "Fact": "edit.facts",
    "InvalidRequest": "edit.errors",
    "Workspace": "edit.api.workspace",
    "apply": "edit.api.edits",
    "ask": "edit.api.edits",
    "load": "edit.models",
    "parse_statement": "edit.facts",
}

if TYPE_CHECKING:
    from edit import arch
    from edit.api.edits import EditResult, apply, ask
    from edit.api.workspace import Change, Workspace
    from edit.errors import EditError, EditFailed, InvalidRequest
    from edit.facts import Fact, parse_statement
    from edit.models import DEFAULT_MODEL, load


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'edit' has no attribute {name!r}")
    module = _LAZY[name]
    if module is None:
        return importlib.import_module(f"edit.{name}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Change",
    "DEFAULT_MODEL",
    "EditError",
    "EditFailed",
    "EditResult",
    "Fact",
    "InvalidRequest",
    "Workspace",
    "apply",
    "ask",
    "arch",
    "load",
    "parse_statement",
]
