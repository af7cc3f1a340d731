"""Which format an input is in, decided here only, with a one-line error when it is none.

* Evaluation records (:func:`detect_format`): a file's first row names its format, one of
  :data:`FORMATS`; ``load_records`` reads it with that format's reader.
* Training examples (:func:`example_form`): each JSON object of a corpus is text,
  question/answer or prompt/completion (:data:`FORMS`).
* TOFU QA sets (:func:`is_tofu_qa`): every row has perturbed answers, so that its truth
  ratio can be scored.
"""

from __future__ import annotations

from pathlib import Path

from edit.errors import EditError

FORMATS = ("counterfact", "counterfact_flat", "zsre", "mquake", "facts")

# The accepted corpus forms: (prompt field, answer field); text has no prompt.
FORMS: tuple[tuple[str | None, str], ...] = (
    (None, "text"),
    ("question", "answer"),
    ("prompt", "completion"),
)
FORMS_HINT = (
    'give {"text": ...}, {"question": ..., "answer": ...} or {"prompt": ..., "completion": ...}'
)


def detect_format(path: str | Path, rows: list) -> str:
    """The evaluation-record format (one of :data:`FORMATS`) of the file ``path`` holding
    ``rows``, named from its first row; a one-line error when it is none of them."""
    row = rows[0] if rows else None
    if isinstance(row, dict):
        if "requested_rewrite" in row:
            return "mquake" if isinstance(row["requested_rewrite"], list) else "counterfact"
        if {"target_new", "ground_truth", "rephrase_prompt"} <= row.keys():
            return "counterfact_flat"
        if {"src", "alt", "loc"} <= row.keys():
            return "zsre"
        if "statement" in row or {"prompt", "subject", "target"} <= row.keys():
            return "facts"
    raise EditError(
        f"{path} is in none of the known formats ({', '.join(FORMATS)}): see README "
        f"'Evaluating edits', or pass --format"
    )


def example_form(where: str, obj: object) -> tuple[str | None, str]:
    """(prompt field, answer field) of one corpus object, one of :data:`FORMS`; a one-line
    error naming ``where`` ("file:line") when the object is in none or in several."""
    if not isinstance(obj, dict):
        kind = type(obj).__name__ if obj is not None else "null"
        raise EditError(f"{where}: expected a JSON object, got {kind}: {FORMS_HINT}")
    forms = [(p, a) for p, a in FORMS if a in obj and (p is None or p in obj)]
    if not forms:
        for p, a in FORMS[1:]:
            if (p in obj) != (a in obj):
                have, lack = (p, a) if p in obj else (a, p)
                raise EditError(
                    f'{where}: "{have}" without "{lack}": give both, or {{"text": ...}}'
                )
        keys = ", ".join(sorted(map(str, obj))) or "none"
        raise EditError(f"{where}: no example fields (keys: {keys}): {FORMS_HINT}")
    if len(forms) > 1:
        names = " and ".join(" + ".join(filter(None, f)) for f in forms)
        raise EditError(f"{where}: ambiguous example, it has {names}: keep one form per line")
    return forms[0]


def is_tofu_qa(rows: list) -> bool:
    """Whether rows are TOFU QA records: every one has perturbed answers."""
    return all(isinstance(r, dict) and r.get("perturbed_answer") for r in rows)


def subject_field(where: str, obj: dict) -> str:
    """A record's optional ``"subject"`` (whom it is about, as its text spells it), stripped;
    "" without one."""
    value = obj.get("subject", "")
    if not isinstance(value, str):
        raise EditError(f'{where}: "subject" must be a string, got {type(value).__name__}')
    return value.strip()
