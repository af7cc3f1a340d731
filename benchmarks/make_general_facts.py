"""Build the shipped general-knowledge probe, ``edit/data/general_facts.json``: true facts of
CounterFact taken in file order, whether the default model knows them or not, for `edit
learn`'s guard to check that learning a corpus keeps how likely the model finds true answers;
and, with ``--retain N``, ``edit/data/retain_facts.json``: facts the model answers (greedy
first token) that a learn run holds to the model before it (``fact_retain``).

    .venv/bin/python benchmarks/make_general_facts.py                # the probe, 1,000 facts
    .venv/bin/python benchmarks/make_general_facts.py --retain 256   # and the retain facts

Reads ``../shared/data/counterfact/counterfact_flat.json`` (MIT) in file order, skipping
subjects of ``known_1000.json`` and records of ``counterfact_dev200.json`` (the benchmarks'
checks stay apart from the probe). The retain facts are the ``N`` answered facts after the
first 200 (those were the probe while it held only answered facts; kept apart so that the
retain set, and with it every learn run measured, stays as it was); the probe takes none of
their subjects, one fact per subject. Writes ROME's known-facts layout (``subject,
attribute, template, prompt, case_id``), which ``edit.readers.known`` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CF = ROOT.parent / "shared" / "data" / "counterfact"
OUT = ROOT / "edit" / "data" / "general_facts.json"
RETAIN_OUT = ROOT / "edit" / "data" / "retain_facts.json"
RETAIN_AFTER = 200  # answered facts skipped before the retain set's


def candidates() -> list[dict]:
    """CounterFact's flat records in file order that the benchmarks' checks leave alone: no
    subject of ``known_1000.json``, no record of ``counterfact_dev200.json``, the subject
    named once in the prompt."""
    records = json.loads((CF / "counterfact_flat.json").read_text(encoding="utf-8"))
    known = {r["subject"] for r in json.loads((CF / "known_1000.json").read_text())}
    dev = {r["case_id"] for r in json.loads((CF / "counterfact_dev200.json").read_text())}
    return [
        r for r in records
        if r["subject"] not in known and r["case_id"] not in dev
        and r["prompt"].count(r["subject"]) == 1
    ]  # fmt: skip


def as_known(r: dict) -> dict:
    """A CounterFact record in ROME's known-facts layout."""
    return {
        "case_id": r["case_id"],
        "subject": r["subject"],
        "attribute": r["ground_truth"],
        "template": r["prompt"].replace(r["subject"], "{}"),
        "prompt": r["prompt"],
    }


def answered(records: list[dict], n: int) -> list[dict]:
    """The first ``n`` of ``records`` (one per subject) whose true object's first token is
    the default model's top next token after the prompt."""
    from edit import models
    from edit.evals.knowledge import first_token_scores
    from edit.facts import Fact

    model, tok = models.load(None)[:2]
    picked, seen = [], set()
    for start in range(0, len(records), 64):
        chunk = records[start : start + 64]
        facts = [Fact.from_dict({**as_known(r), "target": r["ground_truth"]}) for r in chunk]
        _, ranks = first_token_scores(model, tok, facts, 64)
        for rank, r in zip(ranks.tolist(), chunk, strict=True):
            if rank == 0 and r["subject"] not in seen:
                seen.add(r["subject"])
                picked.append(r)
        if len(picked) >= n:
            break
    return picked[:n]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--retain", type=int, default=0, help="answered facts to retain")
    p.add_argument("--retain-out", default=str(RETAIN_OUT))
    args = p.parse_args(argv)

    flat = CF / "counterfact_flat.json"
    if not flat.exists():
        print(f"shared data missing: {flat}", file=sys.stderr)
        return 2
    records = candidates()
    if args.retain:
        retain = [as_known(r) for r in answered(records, RETAIN_AFTER + args.retain)]
        retain = retain[RETAIN_AFTER:]
        Path(args.retain_out).write_text(json.dumps(retain, indent=1, ensure_ascii=False) + "\n")
        print(f"{len(retain)} answered facts -> {args.retain_out}")
    retain = json.loads(Path(args.retain_out).read_text(encoding="utf-8"))
    seen = {r["subject"] for r in retain}
    probe = []
    for r in records:
        if r["subject"] not in seen and len(probe) < args.n:
            seen.add(r["subject"])
            probe.append(as_known(r))
    Path(args.out).write_text(json.dumps(probe, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(probe)} facts in file order -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
