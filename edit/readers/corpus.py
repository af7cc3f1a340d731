"""Training corpora read from files: the examples of a JSON Lines (or JSON array) file.

    examples = read_corpus("private.jsonl")            # a Corpus (list[Example]), validated
                                                       # line by line, .source the path

A corpus file is JSON Lines (or one JSON array, as TOFU ships its forget sets), one object per
example, in one of three forms (:data:`edit.readers.formats.FORMS`):

    {"text": "..."}                                    loss on every token of the text
    {"question": "...", "answer": "..."}               loss on the answer's tokens only
    {"prompt": "...", "completion": "..."}             loss on the completion's tokens only

A record may name its ``"subject"`` (whom the example is about, as its text spells it: TOFU's
records do), which the rename objective reads. Other keys are ignored (TOFU records carry
paraphrases and perturbed answers). An example
holds at most :data:`edit.corpus.MAX_EXAMPLE_CHARS` characters (100,000). Every problem
raises :class:`~edit.errors.EditError` with one line naming the file, the line and the fix.
The examples become tokens in :mod:`edit.corpus`.
"""

from __future__ import annotations

import os
from pathlib import Path

from edit.corpus import Corpus, Example, check_example_size
from edit.errors import EditError
from edit.readers.formats import FORMS_HINT, example_form, subject_field
from edit.readers.rows import json_array_items, jsonl_items


def as_corpus(x: str | os.PathLike | Corpus | list[Example]) -> Corpus:
    """``x`` as one :class:`~edit.corpus.Corpus`: a path is read (:func:`read_corpus`), a
    Corpus is itself, a list of examples is one held in memory."""
    if isinstance(x, Corpus):
        return x
    return read_corpus(x) if isinstance(x, str | os.PathLike) else Corpus(x)


def read_corpus(path: str | os.PathLike) -> Corpus:
    """The examples of a JSON Lines (or JSON array) file, in file order, as one
    :class:`~edit.corpus.Corpus`: its ``source`` the path, its ``records`` each parsed
    object with where it is ("line 7"), for readers of richer forms (TOFU's QA records)
    that need not read the file again.

    Every line is checked with ``json.loads`` first, so that an error names its line.
    """
    items = _parsed_items(Path(path))
    examples = (Example(*_example_fields(path, line, obj), f"{path}:{line}",
                        subject_field(f"{path}:{line}", obj)) for line, obj in items)  # fmt: skip
    return Corpus(examples, str(path), [(f"line {line}", obj) for line, obj in items])


def _parsed_items(path: Path) -> list[tuple[int, object]]:
    """(line, parsed object) of every record, with one-line errors for a missing,
    non-UTF-8, empty or unparsable file."""
    if not path.is_file():
        raise EditError(
            f"corpus file not found: {path} (give a JSON Lines file, one example per line: "
            f"{FORMS_HINT})"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise EditError(f"{path}:{line}: not UTF-8 text: save the file as UTF-8") from None
    if not text.strip():
        raise EditError(f"{path} is empty: give at least one example, one JSON object per line")
    array = text.lstrip().startswith("[")
    items = json_array_items(path, text) if array else jsonl_items(path, text)
    if not items:
        raise EditError(f"{path} has no examples: give at least one JSON object")
    return items


def _example_fields(path: Path, line: int, obj: object) -> tuple[str, str]:
    """(prompt, answer) of one parsed record; ``prompt`` is "" for plain text."""
    where = f"{path}:{line}"
    prompt_key, answer_key = example_form(where, obj)
    values = []
    for key in filter(None, (prompt_key, answer_key)):
        value = obj[key]
        if not isinstance(value, str):
            kind = type(value).__name__ if value is not None else "null"
            raise EditError(f'{where}: "{key}" must be a string, got {kind}')
        if not value.strip():
            raise EditError(f'{where}: "{key}" is empty: give the {key} or remove the line')
        values.append(value)
    prompt, answer = ("", values[0]) if prompt_key is None else (values[0], values[1])
    check_example_size(where, prompt, answer)  # before the model loads, not in training
    return prompt, answer
