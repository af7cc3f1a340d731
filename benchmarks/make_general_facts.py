"""Build the shipped general-knowledge probe, ``edit/data/general_facts.json``: true facts of
CounterFact that the default model answers (greedy first token), for `edit learn` to check
that learning a corpus keeps what the model knew; and, with ``--retain N``, the next N such
facts as ``edit/data/retain_facts.json``, which a learn run may hold to the model before it
(``fact_retain``): other facts than the probe's, so that the probe still checks.

    .venv/bin/python benchmarks/make_general_facts.py             # 200 facts
    .venv/bin/python benchmarks/make_general_facts.py --retain 256

Reads ``../shared/data/counterfact/counterfact_flat.json`` (MIT) in file order and keeps the
first ``--n`` records whose true object's first token is the model's top next token after the
prompt, skipping subjects of ``known_1000.json`` and records of ``counterfact_dev200.json``
(the benchmarks' checks stay apart from the probe). Writes ROME's known-facts layout
(``subject, attribute, template, prompt, case_id``), which ``edit.readers.known`` reads.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--retain", type=int, default=0, help="facts after the probe's, to retain")
    p.add_argument("--retain-out", default=str(RETAIN_OUT))
    args = p.parse_args(argv)

    from edit import lm, models

    flat = CF / "counterfact_flat.json"
    if not flat.exists():
        print(f"shared data missing: {flat}", file=sys.stderr)
        return 2
    records = candidates()
    model, tok = models.load(None)[:2]
    picked, seen = [], set()
    for start in range(0, len(records), 64):
        chunk = records[start : start + 64]
        logp = lm.next_token_logprobs(model, tok, [r["prompt"] for r in chunk])
        for row, r in zip(logp, chunk, strict=True):
            first = lm.encode_continuation(tok, r["ground_truth"])[0]
            if int(row.argmax()) == first and r["subject"] not in seen:
                seen.add(r["subject"])
                picked.append({
                    "case_id": r["case_id"],
                    "subject": r["subject"],
                    "attribute": r["ground_truth"],
                    "template": r["prompt"].replace(r["subject"], "{}"),
                    "prompt": r["prompt"],
                })  # fmt: skip
        if len(picked) >= args.n + args.retain:
            break
    probe, retain = picked[: args.n], picked[args.n : args.n + args.retain]
    Path(args.out).write_text(json.dumps(probe, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(probe)} facts the model knows, from the first {start + len(chunk)} of "
          f"{len(records)} candidates -> {args.out}")  # fmt: skip
    if args.retain:
        Path(args.retain_out).write_text(json.dumps(retain, indent=1, ensure_ascii=False) + "\n")
        print(f"{len(retain)} more -> {args.retain_out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
