"""Plain text for key statistics, read lazily line by line from a file or a datasets name.

    source = text_source("big.parquet")                # plain text for key statistics
    for line in source.lines(): ...

The text is :data:`DEFAULT_TEXT` (the WikiText-2 validation text shipped in the package), a
local UTF-8 text file, a local ``.jsonl`` / ``.json`` / ``.parquet`` file or dataset folder
with a ``text`` column, or a ``datasets`` Hub name; :mod:`edit.stats` keys its statistics on
disk by the source's ``name`` and ``fingerprint``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from edit.errors import EditError

DEFAULT_TEXT = "wikitext2-valid"  # WikiText-2 raw validation, shipped in the package
_RECORD_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_TEXT_HINT = (
    "give a UTF-8 .txt file, a .jsonl / .parquet file with a 'text' column, or a datasets "
    "name (NAME, NAME:CONFIG or NAME:CONFIG:SPLIT)"
)


@dataclass(frozen=True)
class TextSource:
    """Text read lazily, line by line, for key statistics (:mod:`edit.stats`), and how its
    statistics are keyed on disk: ``name`` (a readable stem) and ``fingerprint`` (12 hex
    digits of a hash that changes when the text does)."""

    name: str
    fingerprint: str
    lines: Callable[[], Iterator[str]]
    description: str  # for messages: the file or the datasets name


def shipped_text() -> str:
    """The WikiText-2 raw validation text shipped in the package."""
    return (files("edit") / "data" / "wikitext2_raw_valid.txt").read_text(encoding="utf-8")


def text_source(spec: str | os.PathLike = DEFAULT_TEXT) -> TextSource:
    """The text named by ``spec``: :data:`DEFAULT_TEXT`; a local UTF-8 text file (keyed by
    the hash of its text, as it always was); a local ``.jsonl`` / ``.json`` / ``.parquet``
    file or a local dataset folder, read by ``datasets`` (a ``text`` column); or a
    ``datasets`` Hub name ``NAME[:CONFIG[:SPLIT]]`` (split ``train`` by default). Records
    are streamed: only the text the statistics use is read."""
    spec = str(spec)
    if spec == DEFAULT_TEXT:
        text = shipped_text()
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        return TextSource(DEFAULT_TEXT, digest, lambda: iter(text.splitlines()), "WikiText-2")
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in _RECORD_SUFFIXES:
        builder = _RECORD_SUFFIXES[path.suffix.lower()]
        return TextSource(
            path.stem,
            _file_hash(path),
            lambda: _record_lines(spec, builder=builder, data_files=str(path)),
            spec,
        )
    if path.is_file():
        return TextSource(path.stem, _text_hash(path), lambda: _file_lines(path), spec)
    if path.is_dir():
        stamp = sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                       for f in path.rglob("*") if f.is_file())  # fmt: skip
        digest = hashlib.sha256(json.dumps([str(path.resolve()), stamp]).encode()).hexdigest()
        return TextSource(path.name, digest[:12], lambda: _record_lines(spec, builder=spec), spec)
    local_looking = path.suffix.lower() in {*_RECORD_SUFFIXES, ".txt", ".text"}
    if local_looking or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise EditError(f"statistics corpus not found: {spec} ({_TEXT_HINT})")
    name, _, rest = spec.partition(":")
    config, _, split = rest.partition(":")
    stem = "--".join(filter(None, (name.replace("/", "--"), config, split or "train")))
    digest = hashlib.sha256(f"{name}|{config}|{split or 'train'}".encode()).hexdigest()[:12]
    return TextSource(
        stem,
        digest,
        lambda: _record_lines(spec, builder=name, name=config or None, split=split or "train"),
        spec,
    )


def _file_lines(path: Path) -> Iterator[str]:
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")
    except UnicodeDecodeError:
        raise EditError(f"{path}: not UTF-8 text: save the file as UTF-8") from None


def _text_hash(path: Path) -> str:
    """sha256 of the file's text as Python reads it (universal newlines), in pieces."""
    h = hashlib.sha256()
    try:
        with path.open(encoding="utf-8") as f:
            while piece := f.read(1 << 20):
                h.update(piece.encode())
    except UnicodeDecodeError:
        raise EditError(f"{path}: not UTF-8 text: save the file as UTF-8") from None
    return h.hexdigest()[:12]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.hexdigest()[:12]


def _record_lines(spec: str, *, builder: str, split: str = "train", **kwargs) -> Iterator[str]:
    """The lines of each record's ``text``, streamed by ``datasets``."""
    import datasets

    try:
        records = datasets.load_dataset(builder, split=split, streaming=True, **kwargs)
        first = True
        for row in records:
            if first and "text" not in row:
                columns = ", ".join(sorted(row)) or "none"
                raise EditError(
                    f"statistics corpus {spec} has no 'text' column (columns: {columns}): "
                    f"{_TEXT_HINT}"
                )
            first = False
            text = row["text"]
            if isinstance(text, str):
                yield from text.splitlines()
    except EditError:
        raise
    except Exception as e:  # datasets raises many kinds (not found, offline, bad file)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EditError(f"cannot read statistics corpus {spec}: {first_line}") from None
