"""Evaluation records (edit requests and the prompts that probe them) read from the formats
editing papers use, and the facts files ``edit add --file`` takes.

* ``counterfact``: ROME's CounterFact JSON (``requested_rewrite`` with ``target_new``/
  ``target_true``, ``paraphrase_prompts``, ``neighborhood_prompts``, ``generation_prompts``).
* ``counterfact_flat``: the flattened layout (``prompt`` containing the subject,
  ``target_new``, ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``,
  ``locality_ground_truth``).
* ``zsre``: zsRE in MEND's split (``src``, ``subject``, ``alt``, ``answers``, ``rephrase``,
  ``loc``, ``loc_ans``).
* ``mquake``: MQuAKE's JSON (``requested_rewrite`` a list, ``questions`` 2-4 hop questions,
  ``new_single_hops``); a record per case, its first rewrite the edit and that rewrite's
  own question its question probe; the multi-hop questions are probes only where the case
  has that one rewrite (a case of several edits needs all of them: the MQuAKE benchmark).
* ``facts``: JSON Lines, one fact per line: ``{"statement": "..."}`` or ``{"prompt": ...,
  "subject": ..., "target": ..., "target_true"?, "paraphrases"?, "neighbours"?,
  "probe_questions"?}`` (questions the edit is not given: the question and chat forms).

``load_records`` detects the format (:func:`edit.readers.formats.detect_format`) or takes it,
and reports problems in one line naming the file and the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edit.errors import EditError
from edit.facts import Fact, parse_statement
from edit.readers.formats import FORMATS, detect_format
from edit.readers.rows import read_rows


@dataclass
class Record:
    """One evaluation case: the edit request plus the prompts that probe it."""

    id: str
    fact: Fact  # fact.target is the new object; fact.target_true the old one (if known)
    paraphrases: list[str] = field(default_factory=list)
    neighbours: list[tuple[str, str | None]] = field(default_factory=list)  # (prompt, answer)
    generation_prompts: list[str] = field(default_factory=list)
    format: str = "facts"
    # the fact asked as questions (QS, CS, CG; not given to the edit), with the new
    # object's other names
    questions: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    old_aliases: list[str] = field(default_factory=list)  # the old object's other names
    # questions answered through the edited fact: (questions, new answer, old answer)
    multihop: tuple[list[str], str, str] | None = None


def load_records(
    path: str | Path, fmt: str | None = None, limit: int | None = None
) -> list[Record]:
    """The records of ``path``, in format ``fmt`` (detected from the first row when None),
    the first ``limit`` of them when given."""
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise EditError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    rows, where = read_rows(path)
    if not rows:
        raise EditError(f"{path} holds no records")
    fmt = fmt or detect_format(path, rows)
    if limit is not None:
        if limit < 1:
            raise EditError(f"--limit must be at least 1, got {limit}")
        if limit > len(rows):
            raise EditError(f"--limit {limit} is beyond the {len(rows)} records in {path}")
        rows = rows[:limit]
    reader = _READERS[fmt]
    records = []
    for i, row in enumerate(rows):
        try:
            records.append(reader(i, row))
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            raise EditError(
                f"{path}, {where[i]}: not a valid {fmt} record (missing or bad field {e})"
            ) from None
        except EditError as e:
            raise EditError(f"{path}, {where[i]}: {e}") from None
    return records


def _counterfact(i: int, r: dict) -> Record:
    rw = r["requested_rewrite"]
    fact = Fact(
        prompt=rw["prompt"],
        subject=rw["subject"],
        target=rw["target_new"]["str"],
        target_true=rw["target_true"]["str"],
    )
    return Record(
        id=str(r.get("case_id", i)),
        fact=fact,
        paraphrases=list(r["paraphrase_prompts"]),
        # CounterFact's neighbours share the edited fact's true object
        neighbours=[(p, fact.target_true) for p in r["neighborhood_prompts"]],
        generation_prompts=list(dict.fromkeys(r.get("generation_prompts", []))),
        format="counterfact",
    )


def _counterfact_flat(i: int, r: dict) -> Record:
    fact = Fact.from_dict(
        {
            "prompt": r["prompt"],
            "subject": r["subject"],
            "target": r["target_new"],
            "target_true": r["ground_truth"],
        }
    )
    return Record(
        id=str(r.get("case_id", i)),
        fact=fact,
        paraphrases=[r["rephrase_prompt"]],
        neighbours=[(r["locality_prompt"], r["locality_ground_truth"])],
        format="counterfact_flat",
    )


def _zsre(i: int, r: dict) -> Record:
    fact = Fact.from_dict(
        {
            "prompt": r["src"],
            "subject": r["subject"],
            "target": r["alt"],
            "target_true": r["answers"][0],
        }
    )
    return Record(
        id=str(r.get("case_id", i)),
        fact=fact,
        paraphrases=[r["rephrase"]],
        neighbours=[(r["loc"], r["loc_ans"])],
        format="zsre",
    )


def mquake_names(r: dict, hop: int = 0) -> tuple[list[str], list[str]]:
    """The new and the old object of an MQuAKE case's rewrite ``hop``, each followed by its
    aliases (from the case's single hops that answer with it)."""
    rw = r["requested_rewrite"][hop]
    new, old = rw["target_new"]["str"], rw["target_true"]["str"]
    new_hop = next((h for h in r.get("new_single_hops", []) if h["answer"] == new), {})
    old_hop = next((h for h in r.get("single_hops", []) if h["answer"] == old), {})
    return [new, *new_hop.get("answer_alias", [])], [old, *old_hop.get("answer_alias", [])]


def _mquake(i: int, r: dict) -> Record:
    rw = r["requested_rewrite"][0]
    fact = Fact(rw["prompt"], rw["subject"], rw["target_new"]["str"], rw["target_true"]["str"])
    new, old = mquake_names(r)
    one_edit = len(r["requested_rewrite"]) == 1
    return Record(
        id=str(r.get("case_id", i)),
        fact=fact,
        format="mquake",
        questions=[rw["question"]],
        aliases=new[1:],
        old_aliases=old[1:],
        multihop=(list(r["questions"]), r["new_answer"], r["answer"]) if one_edit else None,
    )


def _facts(i: int, r: dict) -> Record:
    if "statement" in r:
        fact = parse_statement(
            str(r["statement"]), subject=r.get("subject"), target=r.get("target")
        )
        fact = Fact(fact.prompt, fact.subject, fact.target, r.get("target_true"))
    else:
        fact = Fact.from_dict(r)
    return Record(
        id=str(r.get("id", i)),
        fact=fact,
        paraphrases=list(fact.paraphrases),
        neighbours=[(p, None) for p in fact.neighbours],
        format="facts",
        questions=[str(q) for q in r.get("probe_questions", [])],
    )


_READERS = {
    "counterfact": _counterfact,
    "counterfact_flat": _counterfact_flat,
    "zsre": _zsre,
    "mquake": _mquake,
    "facts": _facts,
}
