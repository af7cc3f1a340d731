"""TOFU QA sets (Maini et al. 2024) read from files: questions with the answers to score.

    forget = read_qa("tofu/forget01.json")                  # list[QA]

A record is ``question`` and ``answer`` strings, an optional ``paraphrased_answer``, a list
``perturbed_answer`` (wrong answers the truth ratio compares against) and an optional
``subject`` (the author, as the text spells it); other keys are ignored. TOFU ships its sets
as JSON arrays; JSON Lines is read too. The sets are scored in :mod:`edit.evals.tofu`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edit.corpus import Example
from edit.errors import EditError
from edit.readers.formats import subject_field
from edit.readers.rows import read_rows


@dataclass(frozen=True)
class QA:
    """One TOFU question: its answer, the answer paraphrased, and wrong (perturbed) answers."""

    question: str
    answer: str
    paraphrased: str | None  # None: the set has no paraphrases; the answer stands in
    perturbed: tuple[str, ...]
    subject: str = field(default="", compare=False)  # the author the QA is about, if given

    def example(self) -> Example:
        """The training example: loss on the answer after the question."""
        return Example(self.question, self.answer, subject=self.subject)


def read_qa(path: str | Path, *, need_perturbed: bool = True) -> list[QA]:
    """TOFU QA records from a JSON array (or JSON Lines) file, each checked: ``question`` and
    ``answer`` strings, optional ``paraphrased_answer``, and a non-empty list
    ``perturbed_answer`` (unless ``need_perturbed`` is false)."""
    rows, places = read_rows(path)
    return qa_records(path, list(zip(places, rows, strict=True)), need_perturbed=need_perturbed)


def qa_records(path, records: list[tuple[str, object]], *, need_perturbed: bool = True) -> list[QA]:
    """The checked QA records of ``path`` from its (where, parsed object) pairs, as
    :func:`read_qa` reads them (``edit.corpus.Corpus.records`` holds these already)."""
    if not records:
        raise EditError(f"{path} holds no records")
    items = []
    for place, row in records:
        where = f"{path}, {place}"
        if not isinstance(row, dict):
            raise EditError(f"{where}: expected an object with question and answer")
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise EditError(f'{where}: "{key}" must be a non-empty string')
        para = row.get("paraphrased_answer")
        if para is not None and (not isinstance(para, str) or not para.strip()):
            raise EditError(f'{where}: "paraphrased_answer" must be a non-empty string')
        pert = row.get("perturbed_answer", [])
        if isinstance(pert, str):
            pert = [pert]
        if not isinstance(pert, list) or not all(isinstance(p, str) and p.strip() for p in pert):
            raise EditError(f'{where}: "perturbed_answer" must be a list of non-empty strings')
        if need_perturbed and not pert:
            raise EditError(f'{where}: no "perturbed_answer": the truth ratio needs them')
        items.append(QA(row["question"], row["answer"], para, tuple(pert),
                        subject_field(where, row)))  # fmt: skip
    return items
