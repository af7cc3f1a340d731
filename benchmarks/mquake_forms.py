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
Two hops through the one edit (MH2): the case's second rewrite asks about the first one's new
object ("Who is the chief executive officer of Sony Interactive Entertainment?"); with that
object replaced by the first fact as a noun phrase ("… of the developer of iPad?") it is a
question that goes through the edited fact, whose new answer is the world's (the second
rewrite's true object, Andrew House) and old answer the one through the old object (Tim
Cook, from the case's single hops); teacher-forced in the chat template, as CS. H2: the same
for the second hop asked about the new object directly (does the model know it at all);
MH2k: MH2 over the cases whose H2 holds on the unedited model.
Cases whose two answers are one (a position and a sport) have none.
Multi-hop (MHS): the three 4-hop questions of a case, in the chat template, new answer
against old, after its four edits applied one after another; unedited shown beside.
Two switches of ``--set``/``--against`` are the benchmark's, not edit settings: ``bridge=true``
(a pilot: each edit also trained on "Tell me about <its relation as a noun phrase>." answered
with the unedited model's reply about the new object; docs/methods.md, "Two hops through one
edit") and ``f32round=true`` (the layer round asks at the model's float32, as before its
replies ran in the value optimization's precision).
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


# a rewrite's relation as a noun phrase around its subject, for the two-hop question
NOUN_PHRASES = {
    "P26": "the spouse of {}",
    "P40": "the child of {}",
    "P50": "the author of {}",
    "P69": "the university where {} was educated",
    "P106": "the field of work of {}",
    "P108": "the employer of {}",
    "P112": "the founder of {}",
    "P136": "the type of music that {} plays",
    "P140": "the religion of {}",
    "P169": "the chief executive officer of {}",
    "P170": "the creator of {}",
    "P175": "the performer of {}",
    "P176": "the company that produced {}",
    "P178": "the developer of {}",
    "P286": "the head coach of {}",
    "P413": "the position played by {}",
    "P449": "the original broadcaster of {}",
    "P488": "the chairperson of {}",
    "P641": "the sport of {}",
    "P800": "the work {} is famous for",
    "P1037": "the director of {}",
}


def two_hop(case: dict) -> dict | None:
    """The question two hops through the case's first rewrite (see the module's text): its
    text, new and old answer, and the second hop asked about the new object; None where the
    relation has no noun phrase, the second rewrite is not about the first one's new object,
    or the two answers are one."""
    first, second = case["requested_rewrite"][:2]
    phrase = NOUN_PHRASES.get(first.get("relation_id", ""))
    bridge = first["target_new"]["str"]
    if phrase is None or second["subject"] != bridge or bridge not in second["question"]:
        return None
    new, old = second["target_true"]["str"], case["single_hops"][1]["answer"]
    if new == old:
        return None
    question = second["question"].replace(bridge, phrase.format(first["subject"]))
    return {"question": question, "new": new, "old": old, "hop": second["question"]}


def _two_hop_scores(model, tok, case: dict) -> dict:
    """MH2 and H2 of the case (nothing where it has no two-hop question)."""
    from edit.evals.forms import asked_scores

    q = two_hop(case)
    if q is None:
        return {}
    return {name: asked_scores(model, tok, [text], q["new"], q["old"], forms=("CS",))["CS"]
            for name, text in (("MH2", q["question"]), ("H2", q["hop"]))}  # fmt: skip


BRIDGES: dict[str, tuple[str, str]] = {}  # subject → (bridge question, the object's reply)
BRIDGE_ON = [False]  # the pilot's rows are added while the variant being edited asks for them


def _bridge_pilot(model, tok, cases: list[dict]) -> None:
    """Pilot (a variant's ``bridge=true``, not an edit setting): each case's first fact also
    gets a chat row that asks about its relation as a noun phrase ("Tell me about the
    developer of iPad.") and answers with the unedited model's own reply about the new
    object ("Tell me about Sony Interactive Entertainment."), so that the edit is trained to
    be used where the subject is reached through the relation."""
    import dataclasses as dc

    from edit.lm import greedy
    from edit.methods.algebra import contexts as C
    from edit.questions import chat_prompt

    for case in cases:
        rw = case["requested_rewrite"][0]
        phrase = NOUN_PHRASES.get(rw.get("relation_id", ""))
        if phrase is None:
            continue
        about = greedy(model, tok, [chat_prompt(tok, f"Tell me about {rw['target_new']['str']}.")],
                       max_new_tokens=32)[0]  # fmt: skip
        reply = about[: about.rfind(".") + 1] or about
        BRIDGES[rw["subject"]] = (f"Tell me about {phrase.format(rw['subject'])}.", reply)
    plain = C.Contexts.rows

    def rows(self, tok, fact):
        out = plain(self, tok, fact)
        if not BRIDGE_ON[0] or fact.subject not in BRIDGES or "chat" not in self.forms:
            return out
        q, reply = BRIDGES[fact.subject]
        text = chat_prompt(tok, q)
        end = text.rindex(q) + q.index(fact.subject) + len(fact.subject)
        asked = [r for r in out if r.group[0] in ("chat", "question", "opening")]
        row = dc.replace(C._row(tok, fact, text, end, reply, ("bridge", 0)),
                         weight=asked[0].weight if asked else 0.0)  # fmt: skip
        total = sum(r.weight for r in out) + row.weight
        return [dc.replace(r, weight=r.weight / total) for r in [*out, row]]

    C.Contexts.rows = rows


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
    out.update(_two_hop_scores(model, tok, case))
    return out


def _multihop(model, tok, case: dict) -> float:
    from edit.evals.forms import asked_scores

    s = asked_scores(model, tok, case["questions"], case["new_answer"], case["answer"],
                     forms=("CS",))  # fmt: skip
    return s["CS"]


def _edit(model, tok, fact, settings: dict):
    """(the applied edit or None where it was refused, seconds, value steps)."""
    from contextlib import nullcontext
    from unittest import mock

    import edit
    from edit.api import edits
    from edit.errors import EditFailed

    settings = dict(settings)
    BRIDGE_ON[0] = bool(settings.pop("bridge", False))
    # f32round=true (not an edit setting): the layer round asks at the model's float32, as
    # before its replies ran in the value optimization's precision
    f32 = settings.pop("f32round", False)
    asking = (mock.patch.object(edits, "_asking", lambda model, config: nullcontext()) if f32
              else nullcontext())  # fmt: skip
    t0 = time.perf_counter()
    try:
        with asking:
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
    if any(v.get("bridge") for v in variants.values()):
        _bridge_pilot(model, tok, cases[: args.limit])
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
                      else {k: 0.0 for k in [*FORMS, *before.keys() & set(TWO_HOP)]})  # fmt: skip
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
TWO_HOP = ("MH2", "H2")  # over the cases that have a two-hop question
KNOWN = "MH2k"  # MH2 over the cases whose second hop the unedited model knows


def _summary(rows, seconds, hops, variants) -> dict:
    import torch

    # MH2k: MH2 where the unedited model knows the second hop (H2), where it could be answered
    known = [r for r in rows if r["before"].get("H2") == 1.0]

    def share(key: str, when: str) -> float | None:
        had = ([r[when].get("MH2", 0.0) for r in known] if key == KNOWN
               else [r[when].get(key, 0.0) for r in rows if key in r["before"]])  # fmt: skip
        return 100 * float(np.mean(had)) if had else None

    summary = {
        "records": len(rows),
        "settings": variants,
        "unedited": {k: share(k, "before") for k in [*FORMS, *TWO_HOP, KNOWN]},
        **{v: {k: share(k, v) for k in [*FORMS, *TWO_HOP, KNOWN]} for v in variants},
        "two_hop_cases": sum("MH2" in r["before"] for r in rows),
        "two_hop_known": len(known),
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
        *(
            f"| {k} ({summary['two_hop_cases']} cases) | {summary['unedited'][k]:.1f} | "
            + " | ".join(f"{summary[v][k]:.1f}" for v in variants)
            + " |"
            for k in TWO_HOP
            if summary["two_hop_cases"]
        ),  # fmt: skip
        *(
            [
                f"| MH2, second hop known ({summary['two_hop_known']} cases) | "
                f"{summary['unedited'][KNOWN]:.1f} | "
                + " | ".join(f"{summary[v][KNOWN]:.1f}" for v in variants)
                + " |"
            ]
            if summary["two_hop_known"]
            else []
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
