"""One ledger entry: its schema, written (:func:`header`) and read (:meth:`Entry.from_data`,
:func:`read_entry`) in this one place.

An entry file is a safetensors file: the update's tensors, and a string header holding the
request (facts), method, layers, config, metrics, info, creation time and base-model hash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edit.errors import EditError
from edit.facts import Fact
from edit.ledger.read import EntryData, parse_entry, sha256
from edit.update import Update


@dataclass
class Entry:
    """One recorded change."""

    id: str
    kind: str
    method: str
    facts: list[Fact]
    layers: list[int]
    config: dict[str, Any]
    metrics: dict[str, Any]
    created: str
    update: Update
    path: Path
    hash: str = ""  # sha256 of the file's bytes: the entry's identity in the manifest
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_data(cls, data: EntryData) -> Entry:
        """An entry from a checked entry file; a header that does not parse is refused."""
        return _from_data(data)

    def to_json(self) -> dict:
        """What an export's ledger lists of this entry."""
        return {
            "id": self.id,
            "kind": self.kind,
            "method": self.method,
            "layers": self.layers,
            "facts": [f.to_dict() for f in self.facts],
            "config": self.config,
            "metrics": self.metrics,
            "created": self.created,
        }

    def summary(self) -> str:
        when = self.created[:19]
        if not self.facts:  # a LoRA run (forget / learn) on a corpus
            corpus = self.info.get("corpus", "?")
            n = self.info.get("examples", "?")
            return f"{self.id}  {when}  {self.kind:<6} {self.method:<6} {corpus} ({n} examples)"
        fact = self.facts[0]
        what = (
            f"{fact.text} -> {fact.target}"
            if self.kind == "insert"
            else f"{fact.text} -/-> {fact.target}"
        )
        more = f" (+{len(self.facts) - 1} more)" if len(self.facts) > 1 else ""
        return (
            f"{self.id}  {when}  {self.kind:<6} {self.method:<6} layers {self.layers}  {what}{more}"
        )


def header(
    kind: str,
    method: str,
    facts: list[Fact],
    layers: list[int],
    config: dict,
    metrics: dict,
    info: dict,
    *,
    created: str,
    base_hash: str,
) -> dict[str, str]:
    """The header of a new entry file (its id is added when it is committed)."""
    return {
        "kind": kind,
        "method": method,
        "facts": json.dumps([f.to_dict() for f in facts]),
        "layers": json.dumps(layers),
        "config": json.dumps(config),
        "metrics": json.dumps(metrics),
        "info": json.dumps(info),
        "created": created,
        "base_hash": base_hash,
    }


def _from_data(data: EntryData) -> Entry:
    """An :class:`Entry` from a checked entry file; a header that does not parse is refused."""
    meta = data.meta
    try:
        return Entry(
            id=meta["id"],
            kind=meta["kind"],
            method=meta["method"],
            facts=[Fact.from_dict(d) for d in json.loads(meta["facts"])],
            layers=json.loads(meta["layers"]),
            config=json.loads(meta["config"]),
            metrics=json.loads(meta["metrics"]),
            info=json.loads(meta.get("info", "{}")),
            created=meta["created"],
            update=Update.from_tensors(data.tensors),
            path=data.path,
            hash=data.hash,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # ValueError: also JSON
        raise EditError(
            f"edit file {data.path} has a header that does not parse ({type(e).__name__}: "
            f"{str(e)[:80]}): restore it from a backup"
        ) from None


def read_entry(path: Path) -> Entry:
    """One edit file on its own (no manifest to check it against): for tools and tests."""
    try:
        data = Path(path).read_bytes()
        meta, tensors = parse_entry(data)
    except (OSError, ValueError) as e:
        raise EditError(f"edit file {path} is corrupt or truncated ({e})") from None
    return _from_data(EntryData(meta.get("id", "?"), sha256(data), Path(path), meta, tensors))
