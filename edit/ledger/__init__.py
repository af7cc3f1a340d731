"""The ledger: every recorded change of a workspace, kept as git keeps a repository's:
content-addressed entries and a hash-chained manifest, checked in full on every read. Read
(:mod:`.read`), written (:mod:`.write`) and its entries' schema (:mod:`.entry`) here, and
nowhere else; ``edit.api.workspace`` keeps the model in step with it.

    ledger = read_ledger(Path("edit-workspace"))   # reads and checks; changes nothing
    ledger.problems                                  # [] or one line per problem found
    ledger.active                                    # the entries to apply, in order

An entry's identity is the sha256 of its file's bytes: the safetensors header (id, request,
method, config, layers, metrics) and the tensors, so any change to either changes it.
``manifest.jsonl`` lists every change to the workspace, one JSON line each::

    {"seq": 1, "op": "add", "id": "0001", "hash": "sha256:...", "prev": "sha256:..."}
    {"seq": 2, "op": "revert", "id": "0001", "hash": "sha256:...", "prev": "sha256:..."}

(``"drop"``: an active entry whose file was lost or damaged is given up; what is left of
the file is kept as ``reverted/<id>.damaged``.)

where ``prev`` is the sha256 of the previous line (for the first line, the base model's
hash). A missing, reordered or edited line breaks the chain; a deleted, altered, truncated
or copied entry file disagrees with the manifest. Each problem is named with what to do.

A write goes in three steps, each atomic (``edit.atomic``): the entry is written to a hidden
``edits/.<id>.pending`` file, the manifest gains its line (the commit), the file is renamed
into place (a revert: the line, then the move to ``reverted/``). A crash between two steps
leaves a state this reader understands: a pending file the manifest does not name is
ignored (and deleted by the next writer); one it names is used, and the next writer finishes
the rename.

Where the user has a signing key, every write also signs the new head (:mod:`.sign`,
``signature.json``), so that a forger who rewrites the ledger and recomputes every hash is
caught by ``edit verify`` without the user having kept the head.
"""

from __future__ import annotations

from edit.ledger.entry import Entry, header, read_entry
from edit.ledger.read import (
    ENTRY_SUFFIX,
    FORMAT,
    MANIFEST,
    META,
    EntryData,
    Ledger,
    active_count,
    manifest_line,
    parse_entry,
    read_ledger,
    read_meta,
    sha256,
    unborn,
)

__all__ = [
    "ENTRY_SUFFIX",
    "FORMAT",
    "MANIFEST",
    "META",
    "Entry",
    "EntryData",
    "Ledger",
    "active_count",
    "header",
    "manifest_line",
    "parse_entry",
    "read_entry",
    "read_ledger",
    "read_meta",
    "sha256",
    "unborn",
]
