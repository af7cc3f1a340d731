"""Training corpora for unlearning and learning: reading, validating and tokenizing examples.

    examples = read_corpus("private.jsonl")            # list[Example], validated line by line
    ids, mask, labels = tokenize_examples(tok, examples, max_len=256)
    retain = wikitext_retain(tok, n_examples=64)       # the default retain set
    source = text_source("big.parquet")                # plain text for key statistics

A corpus file is JSON Lines (or one JSON array, as TOFU ships its forget sets), one object per
example, in one of three forms:

    {"text": "..."}                                    loss on every token of the text
    {"question": "...", "answer": "..."}               loss on the answer's tokens only
    {"prompt": "...", "completion": "..."}             loss on the completion's tokens only

Other keys are ignored (TOFU records carry paraphrases and perturbed answers). Every problem
raises :class:`~edit.errors.EditError` with one line naming the file, the line and the fix.

Tokens follow :mod:`edit.lm`: every sequence opens with the model's start token(s)
(:func:`edit.lm.start_ids`), a prompt is read as :func:`edit.lm.encode` reads it, and an answer
as :func:`edit.lm.encode_continuation` reads it (a leading space, no special tokens), so the
loss trained here is the NLL that ``lm.continuation_logprobs`` measures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import torch

from edit import lm
from edit.errors import EditError, InvalidRequest

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of a token that carries no loss (prompt, start token, padding)

# The accepted forms: (prompt field, answer field); text has no prompt.
_FORMS: tuple[tuple[str | None, str], ...] = (
    (None, "text"),
    ("question", "answer"),
    ("prompt", "completion"),
)
_FORMS_HINT = (
    'give {"text": ...}, {"question": ..., "answer": ...} or {"prompt": ..., "completion": ...}'
)


@dataclass(frozen=True)
class Example:
    """One training example. ``prompt == ""`` marks plain text: the loss covers all of
    ``answer``. Otherwise the loss covers the answer read as a continuation of the prompt."""

    prompt: str
    answer: str
    where: str = field(default="", compare=False)  # "file:line", for error messages

    @property
    def is_text(self) -> bool:
        return self.prompt == ""

    def fingerprint(self) -> str:
        """A short stable hash of (prompt, answer): how the ledger tells whether a corpus to
        forget was learned by an earlier entry."""
        data = json.dumps([self.prompt, self.answer], ensure_ascii=False).encode()
        return hashlib.sha256(data).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_corpus(path: str | os.PathLike) -> list[Example]:
    """The examples of a JSON Lines (or JSON array) file, in file order.

    Every line is checked with ``json.loads`` first, so that an error names its line; the
    validated rows then become a ``datasets.Dataset`` (see :func:`corpus_dataset`).
    """
    dataset = corpus_dataset(path)
    return [
        Example(row["prompt"], row["answer"], f"{path}:{row['line']}") for row in dataset.to_list()
    ]


def corpus_dataset(path: str | os.PathLike):
    """The validated corpus as a ``datasets.Dataset`` with columns ``prompt``, ``answer``
    (``prompt`` empty for plain text) and ``line`` (1-based line number in the file)."""
    import datasets

    rows = [
        {"prompt": prompt, "answer": answer, "line": line}
        for line, prompt, answer in _validated_rows(Path(path))
    ]
    return datasets.Dataset.from_list(rows)


def _validated_rows(path: Path) -> list[tuple[int, str, str]]:
    if not path.is_file():
        raise EditError(
            f"corpus file not found: {path} (give a JSON Lines file, one example per line: "
            f"{_FORMS_HINT})"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise EditError(f"{path}:{line}: not UTF-8 text: save the file as UTF-8") from None
    if not text.strip():
        raise EditError(f"{path} is empty: give at least one example, one JSON object per line")
    items = _json_array_items(path, text) if text.lstrip().startswith("[") else _lines(path, text)
    if not items:
        raise EditError(f"{path} has no examples: give at least one JSON object")
    return [(line, *_example_fields(path, line, obj)) for line, obj in items]


def _lines(path: Path, text: str) -> list[tuple[int, object]]:
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


def _json_array_items(path: Path, text: str) -> list[tuple[int, object]]:
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


def _example_fields(path: Path, line: int, obj: object) -> tuple[str, str]:
    """(prompt, answer) of one parsed record; ``prompt`` is "" for plain text."""
    where = f"{path}:{line}"
    if not isinstance(obj, dict):
        kind = type(obj).__name__ if obj is not None else "null"
        raise EditError(f"{where}: expected a JSON object, got {kind}: {_FORMS_HINT}")
    forms = [(p, a) for p, a in _FORMS if a in obj and (p is None or p in obj)]
    if not forms:
        for p, a in _FORMS[1:]:
            if (p in obj) != (a in obj):
                have, lack = (p, a) if p in obj else (a, p)
                raise EditError(
                    f'{where}: "{have}" without "{lack}": give both, or {{"text": ...}}'
                )
        keys = ", ".join(sorted(map(str, obj))) or "none"
        raise EditError(f"{where}: no example fields (keys: {keys}): {_FORMS_HINT}")
    if len(forms) > 1:
        names = " and ".join(" + ".join(filter(None, f)) for f in forms)
        raise EditError(f"{where}: ambiguous example, it has {names}: keep one form per line")
    prompt_key, answer_key = forms[0]
    values = []
    for key in filter(None, (prompt_key, answer_key)):
        value = obj[key]
        if not isinstance(value, str):
            kind = type(value).__name__ if value is not None else "null"
            raise EditError(f'{where}: "{key}" must be a string, got {kind}')
        if not value.strip():
            raise EditError(f'{where}: "{key}" is empty: give the {key} or remove the line')
        values.append(value)
    return ("", values[0]) if prompt_key is None else (values[0], values[1])


# --------------------------------------------------------------------------------------------
# Tokenizing
# --------------------------------------------------------------------------------------------


def encode_example(tok, example: Example, max_len: int) -> tuple[list[int], int]:
    """(token ids, number of leading tokens without loss) of one example, at most ``max_len``
    tokens (cut at the end).

    Text: start token(s) + the text; every text token carries loss. Question/answer: the
    prompt as :func:`edit.lm.encode` reads it, then the answer as
    :func:`edit.lm.encode_continuation` reads it; only answer tokens carry loss.
    """
    if example.is_text:
        prefix = lm.encode(tok, "")  # the start token(s), and a BOS the tokenizer adds itself
        body = list(tok(example.answer, add_special_tokens=False, verbose=False).input_ids)
    else:
        prefix = lm.encode(tok, example.prompt)
        body = lm.encode_continuation(tok, example.answer)
    ids = (prefix + body)[:max_len]
    if len(ids) <= len(prefix):
        where = f"{example.where}: " if example.where else ""
        raise InvalidRequest(
            f"{where}no answer token fits in max_len={max_len} tokens after a prompt of "
            f"{len(prefix)}: shorten the prompt or raise max_len"
        )
    if len(prefix) + len(body) > max_len:
        log.debug("example %s cut to %d tokens", example.where or "(unnamed)", max_len)
    return ids, len(prefix)


def collate(
    encoded: list[tuple[list[int], int]], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (B, T), right-padded. ``labels`` equals
    ``input_ids`` on loss tokens and :data:`IGNORE_INDEX` elsewhere (Hugging Face convention:
    the logits at position t-1 predict ``labels[t]``)."""
    ids, mask = lm.right_pad([seq for seq, _ in encoded], pad, "cpu")
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (seq, n_prompt) in enumerate(encoded):
        labels[i, n_prompt : len(seq)] = ids[i, n_prompt : len(seq)]
    return ids, mask, labels


def tokenize_examples(
    tok, examples: list[Example], max_len: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), each (B, T) on the CPU: see :func:`encode_example`
    and :func:`collate`."""
    if not examples:
        raise InvalidRequest("no examples to tokenize")
    return collate([encode_example(tok, ex, max_len) for ex in examples], lm.pad_id(tok))


# --------------------------------------------------------------------------------------------
# The default retain set
# --------------------------------------------------------------------------------------------


def wikitext_retain(tok, n_examples: int = 64, tokens_per_example: int = 64) -> list[Example]:
    """``n_examples`` plain-text examples of about ``tokens_per_example`` tokens each (cut at
    word boundaries): consecutive slices from the start of the WikiText-2 text shipped in the
    package (blank lines and ``= Heading =`` lines dropped). Unlearning keeps the model's NLL
    on them in place."""
    if n_examples < 1 or tokens_per_example < 1:
        raise InvalidRequest(
            f"retain set size must be >= 1 example of >= 1 token, got {n_examples} x "
            f"{tokens_per_example}"
        )
    lines = [s.strip() for s in shipped_text().splitlines()]
    lines = [s for s in lines if s and not (s.startswith("=") and s.endswith("="))]
    needed = n_examples * tokens_per_example + tokens_per_example  # room to reach a word end
    n_lines = 16
    while True:  # tokenize a growing prefix of the text until it holds enough tokens
        text = " ".join(lines[:n_lines])
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        starts = [start for start, _ in enc["offset_mapping"]]
        if len(starts) >= needed or n_lines >= len(lines):
            break
        n_lines *= 2

    def word_start(j: int) -> bool:
        c = starts[j]
        return c == 0 or text[c].isspace() or text[c - 1].isspace()

    examples: list[Example] = []
    i = 0
    while len(examples) < n_examples and i < len(starts):
        j = min(i + tokens_per_example, len(starts))
        while j < len(starts) and not word_start(j):
            j += 1
        piece = text[starts[i] : starts[j] if j < len(starts) else len(text)].strip()
        if piece:
            examples.append(Example("", piece, f"wikitext2[{len(examples)}]"))
        i = j
    return examples


# --------------------------------------------------------------------------------------------
# Plain text for key statistics
# --------------------------------------------------------------------------------------------

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
