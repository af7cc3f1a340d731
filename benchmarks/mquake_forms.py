"""Edits asked the way the model is used: MQuAKE facts edited one at a time with ROME, then
asked as the cloze prompt, as a plain question, in the chat template, and (a case's four
edits together) as multi-hop questions.

    .venv/bin/python benchmarks/mquake_forms.py --limit 40 --multihop 10
    .venv/bin/python benchmarks/mquake_forms.py --limit 40 --multihop 0 \
        --against 'forms=[]' --against prompt_key=false   # and the cloze-only objective

Protocol (each figure the share of edits, in %): "takes" = the new object's mean token
log-likelihood beats the old one's, teacher-forced (the CounterFact efficacy definition),
after the cloze prompt (ES), after ``Question: …\\nAnswer:`` (QS), and after the question as
a user turn of the model's chat template, the answer opening the assistant's turn (CS); CG =
the greedy chat answer names the new object or an alias. The greedy chat reply a user reads
(48 tokens) to the same question: it names the subject (RS), the new object (RN), the old one
(RO), loops (RL), states the edit (RE: subject and new named, old not, no loop); RU: the
reply to the next case's question is unchanged. The questions asked are MQuAKE's
own; the edit is given only the cloze fact (its questions are made by ``edit.questions``,
which for most relations makes MQuAKE's wording too; ``--unseen-question`` leaves that one
out of the edit's rows, so that the question asked is one it never trained on).
Multi-hop (MHS): the three 4-hop questions of a case, in the chat template, new answer
against old, after its four edits applied one after another; unedited shown beside.
Each single edit is undone before the next. Records: the first rewrite of ``--limit`` cases
of ``mquake_hard_429.json`` from ``--start``. Writes ``benchmarks/results/mquake_forms.*``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mquake" / "mquake_hard_429.json"


def rewrite_fact(rw: dict, unseen_question: bool = False):
    """The fact of one MQuAKE rewrite (its cloze prompt, subject, new and old object); with
    ``unseen_question``, given the questions made from its prompt other than MQuAKE's own,
    so that the question asked is one the edit never trained on."""
    from edit.facts import Fact
    from edit.questions import questions_for

    fact = Fact(rw["prompt"], rw["subject"], rw["target_new"]["str"], rw["target_true"]["str"])
    if not unseen_question:
        return fact
    made = tuple(q for q in questions_for(fact) if q != rw["question"])
    return dataclasses.replace(fact, questions=made)


def _single(model, tok, case: dict, unrelated: str, unrelated_before: str | None) -> dict:
    """ES, QS, CS, CG of the case's first rewrite, the reply figures of the greedy chat reply
    to its question, and RU: the reply to ``unrelated`` equals ``unrelated_before``."""
    from edit import lm
    from edit.evals import metrics as M
    from edit.evals.forms import asked_scores, chat_replies
    from edit.readers.records import mquake_names

    rw = case["requested_rewrite"][0]
    fact = rewrite_fact(rw)
    new, old = mquake_names(case)
    scores = lm.continuation_scores(model, tok, [fact.text] * 2, [fact.target, fact.target_true])
    nll = [s.mean_nll for s in scores]
    out = {"ES": M.success(nll[:1], nll[1:])}
    out.update(asked_scores(model, tok, [rw["question"]], fact.target, fact.target_true, new[1:]))
    reply, other = chat_replies(model, tok, [rw["question"], unrelated])
    out.update(M.reply_figures(reply, fact.subject, new, old))
    out["RU"] = 1.0 if unrelated_before is None else float(other == unrelated_before)
    out["reply"], out["unrelated_reply"] = reply, other
    return out


def _multihop(model, tok, case: dict) -> float:
    from edit.evals.forms import asked_scores

    s = asked_scores(model, tok, case["questions"], case["new_answer"], case["answer"],
                     forms=("CS",))  # fmt: skip
    return s["CS"]


def _edit(model, tok, fact, settings: dict):
    """(the applied edit or None where it was refused, seconds, value steps)."""
    import edit
    from edit.errors import EditFailed

    t0 = time.perf_counter()
    try:
        res = edit.apply(model, tok, fact, method="rome", describe=False, progress=False,
                         **settings)  # fmt: skip
    except EditFailed:
        res = None
    return res, time.perf_counter() - t0, (res.info.get("steps") if res else None)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import edit
    from benchmarks.recording import write_results
    from edit.config import parse_settings

    variants = {"edited": parse_settings(args.set)}
    if args.against is not None:
        variants["against"] = parse_settings(args.against)
    cases = json.loads(Path(args.data).read_text())
    model, tok = edit.load()
    cases = cases[args.start :]
    rows, seconds = _single_edits(model, tok, cases[: args.limit], variants,
                                  args.unseen_question)  # fmt: skip
    hops = _multihop_cases(model, tok, cases[: args.multihop], variants["edited"])
    summary = _summary(rows, seconds, hops, variants)
    table = _table(summary, variants, args.against, hops)
    print(table)
    print(f"refused {summary['refused']}" + (f"; cost ratio {summary['cost_ratio']:.2f}"
                                             if "cost_ratio" in summary else ""))  # fmt: skip
    write_results(args.out, summary, table, {"rows": rows, "multihop": hops})
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--start", type=int, default=0,
                   help="first case (the chat settings were chosen on cases 0-19)")  # fmt: skip
    p.add_argument("--limit", type=int, default=40, help="single edits (one per case)")
    p.add_argument("--multihop", type=int, default=10, help="cases edited 4 facts at a time")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--against",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="also edit each record with these settings (alternating, in this run): "
        "scores and seconds side by side, the cost as a ratio of medians",
    )
    p.add_argument("--unseen-question", action="store_true",
                   help="single edits not given MQuAKE's question: the chat rows use the other "
                   "questions made from the prompt")  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mquake_forms"))
    return p


def _single_edits(model, tok, cases: list[dict], variants: dict, unseen_question: bool):
    """Each case's first rewrite edited alone with every variant (alternating which goes
    first, no order bias), scored before and after, undone after: rows and seconds."""
    rows = []
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for i, case in enumerate(cases):
        rw = case["requested_rewrite"][0]
        # the next case's question, whose reply this edit should leave as it was
        unrelated = cases[(i + 1) % len(cases)]["requested_rewrite"][0]["question"]
        before = _single(model, tok, case, unrelated, None)
        row = {"case": case["case_id"], "fact": rewrite_fact(rw).statement, "before": before}
        for v in list(variants) if i % 2 == 0 else list(reversed(variants)):
            res, sec, steps = _edit(model, tok, rewrite_fact(rw, unseen_question), variants[v])
            seconds[v].append(sec)
            row[v] = (_single(model, tok, case, unrelated, before["unrelated_reply"]) if res
                      else {k: 0.0 for k in FORMS})  # fmt: skip
            row[v].update(
                taken=bool(res),
                seconds=round(sec, 2),
                steps=steps,
                layer_round=res.metrics.get("layer_round") if res else None,
            )
            if res:
                res.undo()
        rows.append(row)
        line = " || ".join(
            f"{v}: ES {row[v]['ES']:.0f} QS {row[v]['QS']:.0f} CS {row[v]['CS']:.0f} "
            f"RE {row[v]['RE']:.0f} RU {row[v]['RU']:.0f} "
            f"{row[v]['seconds']:.1f}s/{row[v]['steps']} steps"
            for v in variants
        )
        answer = row["edited"].get("reply", "")[:60]
        print(f"[{i + 1}/{len(cases)}] {row['fact']!r}: {line} | {answer!r}", flush=True)
    return rows, seconds


def _multihop_cases(model, tok, cases: list[dict], settings: dict) -> list[dict]:
    """Each case's four edits applied one after another, its multi-hop questions asked
    before and after; undone after."""
    hops = []
    for case in cases:
        unedited = _multihop(model, tok, case)
        handles = []
        for rw in case["requested_rewrite"]:
            res, _, _ = _edit(model, tok, rewrite_fact(rw), settings)
            if res:
                handles.append(res)
        edited = _multihop(model, tok, case)
        for h in reversed(handles):
            h.undo()
        hops.append({"case": case["case_id"], "unedited": unedited, "edited": edited,
                     "edits_taken": len(handles)})  # fmt: skip
    return hops


FORMS = ("ES", "QS", "CS", "CG", "RS", "RN", "RO", "RL", "RE", "RU")


def _summary(rows, seconds, hops, variants) -> dict:
    import torch

    def share(key: str, when: str) -> float:
        return 100 * float(np.mean([r[when].get(key, 0.0) for r in rows]))

    summary = {
        "records": len(rows),
        "settings": variants,
        "unedited": {k: share(k, "before") for k in FORMS},
        **{v: {k: share(k, v) for k in FORMS} for v in variants},
        "refused": {v: sum(not r[v]["taken"] for r in rows) for v in variants},
        "seconds_per_edit_median": {v: float(np.median(s)) for v, s in seconds.items()},
        "multihop_cases": len(hops),
        "MHS_unedited": 100 * float(np.mean([h["unedited"] for h in hops])) if hops else None,
        "MHS_edited": 100 * float(np.mean([h["edited"] for h in hops])) if hops else None,
        "threads": torch.get_num_threads(),
    }
    if "against" in variants:
        med = summary["seconds_per_edit_median"]
        summary["cost_ratio"] = med["edited"] / med["against"]
    return summary


def _table(summary: dict, variants: dict, against: list[str] | None, hops: list) -> str:
    names = {"edited": "after the edit", "against": f"after the edit ({' '.join(against or [])})"}
    lines = [
        "| form | unedited | " + " | ".join(names[v] for v in variants) + " |",
        "|---|---|" + "---|" * len(variants),
        *(
            f"| {k} | {summary['unedited'][k]:.1f} | "
            + " | ".join(f"{summary[v][k]:.1f}" for v in variants)
            + " |"
            for k in FORMS
        ),  # fmt: skip
        "| median seconds per edit | | "
        + " | ".join(f"{summary['seconds_per_edit_median'][v]:.1f}" for v in variants)
        + " |",
    ]
    if hops:
        lines.append(f"| MHS ({len(hops)} cases, 4 edits each) | {summary['MHS_unedited']:.1f} "
                     f"| {summary['MHS_edited']:.1f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
