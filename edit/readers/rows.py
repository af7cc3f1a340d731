"""JSON and JSON Lines files as rows, each with where it is in the file for error messages.

Two readings, one per kind of input, kept apart because their messages differ:

* :func:`read_rows` (evaluation records, TOFU sets): a JSON list or JSON Lines; a row is
  placed as "record 3" (in a list) or "line 7".
* :func:`jsonl_items` and :func:`json_array_items` (training corpora): every value with the
  line it starts on, a JSON array parsed element by element so that an error names its line.
"""

from __future__ import annotations

import json
from pathlib import Path

from edit.errors import EditError


def read_rows(path: str | Path) -> tuple[list, list[str]]:
    """The rows of a JSON list or JSON Lines file, and where each is in the file ("record 3"
    in a JSON list, "line 7" in JSON Lines) for error messages. One-line errors for a missing,
    unreadable, empty or unparsable file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EditError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EditError(f"cannot read {path}: {e}") from None
    if not text.strip():
        raise EditError(f"{path} is empty: it holds no records")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise EditError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
        return rows, [f"record {i}" for i in range(len(rows))]
    rows, where = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise EditError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        where.append(f"line {n}")
    return rows, where


def jsonl_items(path: Path, text: str) -> list[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a JSON Lines file."""
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise EditError(
                f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}): "
                f"write one JSON object per line"
            ) from None
    return items


def json_array_items(path: Path, text: str) -> list[tuple[int, object]]:
    """(line where it starts, parsed value) for every element of a file holding one JSON
    array, parsed element by element so that an error names its line."""
    decoder = json.JSONDecoder()

    def fail(pos: int, what: str) -> EditError:
        line = text.count("\n", 0, pos) + 1
        return EditError(
            f"{path}:{line}: not valid JSON ({what}): fix the file, or write JSON Lines"
        )

    def skip_space(pos: int) -> int:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        return pos

    pos = skip_space(text.index("[") + 1)
    items: list[tuple[int, object]] = []
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise fail(e.pos, e.msg) from None
            items.append((text.count("\n", 0, pos) + 1, value))
            pos = skip_space(end)
            if pos < len(text) and text[pos] == ",":
                pos = skip_space(pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            raise fail(pos, "expected ',' or ']' after an element")
    if skip_space(pos) < len(text):
        raise fail(skip_space(pos), "extra data after the array")
    return items
