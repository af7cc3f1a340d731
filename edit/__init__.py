"""edit: change what a causal language model knows.

import edit
model, tok = edit.load()                                   # embedded SmolLM2-135M
result = edit.apply(model, tok, "Paris is capital of Italy")  # ROME, in memory
print(edit.ask(model, tok, "Paris is the capital of which country?", chat=True))
result.undo()

ws = edit.Workspace.open("my-edits")                       # a ledger on disk
entry = ws.add("Paris is capital of Italy")
ws.revert(entry.id); ws.export("merged-model/")
"""

from __future__ import annotations

from edit import arch
from edit.api import EditResult, apply, ask
from edit.errors import EditError, EditFailed, InvalidRequest
from edit.facts import Fact, parse_statement
from edit.models import DEFAULT_MODEL, load
from edit.workspace import Workspace

__all__ = [
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
