"""Edits asked the way the model is used: MQuAKE facts edited one at a time with ROME, then
asked as the cloze prompt, as a plain question, in the chat template, and (a case's four
edits together) as multi-hop questions.

    .venv/bin/python benchmarks/mquake_forms.py --limit 40 --multihop 10
    .venv/bin/python benchmarks/mquake_forms.py --limit 40 --set 'forms=[]'   # cloze only

Protocol (each figure the share of edits, in %): "takes" = the new object's mean token
log-likelihood beats the old one's, teacher-forced (the CounterFact efficacy definition),
after the cloze prompt (ES), after ``Question: …\\nAnswer:`` (QS), and after the question as
a user turn of the model's chat template, the answer opening the assistant's turn (CS); CG =
the greedy chat answer names the new object or an alias. The questions asked are MQuAKE's
own; the edit is given only the cloze fact (its questions are made by ``edit.questions``).
Multi-hop (MHS): the three 4-hop questions of a case, in the chat template, new answer
against old, after its four edits applied one after another; unedited shown beside.
Each single edit is undone before the next. Records: the first rewrite of the first
``--limit`` cases of ``mquake_hard_429.json``. Writes ``benchmarks/results/mquake_forms.*``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mquake" / "mquake_hard_429.json"


def _fact(rw: dict):
    from edit.facts import Fact

    return Fact(rw["prompt"], rw["subject"], rw["target_new"]["str"], rw["target_true"]["str"])


def _single(model, tok, rw: dict, aliases: list[str]) -> dict:
    from edit import lm
    from edit.evals import metrics as M
    from edit.evals.forms import asked_scores

    fact = _fact(rw)
    scores = lm.continuation_scores(model, tok, [fact.text] * 2, [fact.target, fact.target_true])
    nll = [-float(s.logprobs.mean()) for s in scores]
    out = {"ES": M.success(nll[:1], nll[1:])}
    out.update(asked_scores(model, tok, [rw["question"]], fact.target, fact.target_true, aliases))
    return out


def _multihop(model, tok, case: dict) -> float:
    from edit.evals.forms import asked_scores

    s = asked_scores(model, tok, case["questions"], case["new_answer"], case["answer"],
                     forms=("CS",))  # fmt: skip
    return s["CS"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--limit", type=int, default=40, help="single edits (one per case)")
    p.add_argument("--multihop", type=int, default=10, help="cases edited 4 facts at a time")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mquake_forms"))
    args = p.parse_args(argv)

    import torch

    import edit
    from benchmarks.recording import write_results
    from edit.cli import parse_settings
    from edit.errors import EditFailed

    settings = parse_settings(args.set)
    cases = json.loads(Path(args.data).read_text())
    model, tok = edit.load()
    rows, seconds = [], []
    for i, case in enumerate(cases[: args.limit]):
        rw = case["requested_rewrite"][0]
        aliases = case["new_single_hops"][0].get("answer_alias", [])
        before = _single(model, tok, rw, aliases)
        t0 = time.perf_counter()
        try:
            res = edit.apply(model, tok, _fact(rw), method="rome", describe=False,
                             progress=False, **settings)  # fmt: skip
        except EditFailed:
            res = None
        seconds.append(time.perf_counter() - t0)
        after = _single(model, tok, rw, aliases) if res else {k: 0.0 for k in before}
        if res:
            res.undo()
        rows.append({"case": case["case_id"], "fact": _fact(rw).statement, "taken": bool(res),
                     "before": before, "after": after})  # fmt: skip
        a = after
        print(f"[{i + 1}/{args.limit}] {_fact(rw).statement!r}: ES {a['ES']:.0f} QS {a['QS']:.0f} "
              f"CS {a['CS']:.0f} CG {a.get('CG', 0):.0f} | "
              f"{(a.get('chat_answers') or [''])[0][:60]!r}", flush=True)  # fmt: skip
    hops = []
    for case in cases[: args.multihop]:
        unedited = _multihop(model, tok, case)
        handles = []
        for rw in case["requested_rewrite"]:
            try:
                handles.append(edit.apply(model, tok, _fact(rw), method="rome", describe=False,
                                          progress=False, **settings))  # fmt: skip
            except EditFailed:
                pass
        edited = _multihop(model, tok, case)
        for h in reversed(handles):
            h.undo()
        hops.append({"case": case["case_id"], "unedited": unedited, "edited": edited,
                     "edits_taken": len(handles)})  # fmt: skip

    def share(key: str, when: str) -> float:
        return 100 * float(np.mean([r[when].get(key, 0.0) for r in rows]))

    summary = {
        "records": len(rows),
        "settings": settings,
        "unedited": {k: share(k, "before") for k in ("ES", "QS", "CS", "CG")},
        "edited": {k: share(k, "after") for k in ("ES", "QS", "CS", "CG")},
        "refused": sum(not r["taken"] for r in rows),
        "seconds_per_edit_median": float(np.median(seconds)),
        "multihop_cases": len(hops),
        "MHS_unedited": 100 * float(np.mean([h["unedited"] for h in hops])) if hops else None,
        "MHS_edited": 100 * float(np.mean([h["edited"] for h in hops])) if hops else None,
        "threads": torch.get_num_threads(),
    }
    lines = [
        "| form | unedited | after the edit |",
        "|---|---|---|",
        *(
            f"| {k} | {summary['unedited'][k]:.1f} | {summary['edited'][k]:.1f} |"
            for k in ("ES", "QS", "CS", "CG")
        ),  # fmt: skip
    ]
    if hops:
        lines.append(f"| MHS ({len(hops)} cases, 4 edits each) | {summary['MHS_unedited']:.1f} "
                     f"| {summary['MHS_edited']:.1f} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    print(f"refused {summary['refused']}; median {summary['seconds_per_edit_median']:.2f} s/edit")
    write_results(args.out, summary, table, {"rows": rows, "multihop": hops})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
