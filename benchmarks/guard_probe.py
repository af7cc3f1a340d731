"""Which general-knowledge probe tells a learn run that kept what the model knew from one
that did not? Reads a model before and after a change on several probes built from
CounterFact and prints each probe's top-1 share before and after, beside the known-facts
check the benchmarks use (top-1 of ROME's known_1000.json).

    .venv/bin/python benchmarks/guard_probe.py --workspace bench-out/learn40/ws --entry 0001

The change is the workspace's first entry (``--entry``): "before" is the base model
(``--model``) loaded fresh, "after" the workspace without the one entry after it, if any (a
forget run after the learn run). The probes:

* ``shipped``: ``edit/data/general_facts.json``, what the guard reads (1,000 facts in file
  order, whether the model knows them or not);
* ``answered top-1, first 200``: the candidates' first 200 facts (one per subject) that the
  base model answers top-1, as the guard's probe was built before (100 % before: only losses
  can show);
* ``answered, firm``: of CounterFact's candidate facts (``make_general_facts.candidates``),
  those the base model answers top-1 with P >= 0.5;
* ``top-2``, ``top-5``: those whose true first token is among the base model's two or five
  likeliest (gains and losses both show);
* ``all``: every candidate, as it comes.

The factual prompts a learn run holds to the model (``edit/data/retain_facts.json``) are
left out of every probe. Beside each probe's top-1 share, the change of the geometric-mean
probability of its answers' first tokens (what the guard bounds). Writes ``<out>.json`` and
``<out>.md``; ``--dump FILE`` also saves the per-fact scores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KNOWN = ROOT.parent / "shared" / "data" / "counterfact" / "known_1000.json"


def first_answered(cands: list[dict], top, n: int) -> list[int]:
    """Indices of the first ``n`` candidates (one per subject) answered top-1."""
    out, seen = [], set()
    for i, r in enumerate(cands):
        if bool(top[i]) and r["subject"] not in seen and len(out) < n:
            seen.add(r["subject"])
            out.append(i)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", required=True)
    p.add_argument("--entry", required=True, help="the change to read (e.g. a learn entry)")
    p.add_argument("--model", default=None, help="the workspace's base model (default: the "
                   "default model)")  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "guard_probe"))
    p.add_argument("--dump", default=None, help="also save the per-fact scores (torch.save)")
    args = p.parse_args(argv)

    import torch

    from benchmarks.make_general_facts import candidates
    from benchmarks.recording import write_results
    from edit import models
    from edit.api.workspace import Workspace
    from edit.evals.knowledge import first_token_scores
    from edit.facts import Fact
    from edit.readers.known import load_known

    if not KNOWN.exists():
        print(f"shared data missing: {KNOWN}", file=sys.stderr)
        return 2
    data = ROOT / "edit" / "data"
    retain = {r["case_id"] for r in json.loads((data / "retain_facts.json").read_text())}
    shipped = {r["case_id"] for r in json.loads((data / "general_facts.json").read_text())}
    cands = [r for r in candidates() if r["case_id"] not in retain]
    known = load_known(KNOWN)
    facts = [Fact(r["prompt"].replace(r["subject"], "{}"), r["subject"], r["ground_truth"])
             for r in cands] + known  # fmt: skip

    ws = Workspace.open(args.workspace)
    entry = ws.entry(args.entry)
    ids = [e.id for e in ws.entries()]
    if ids[0] != entry.id or len(ids) > 2:
        print("the entry must be the workspace's first, with at most one after it (a forget "
              "run after the learn run, left out)", file=sys.stderr)  # fmt: skip
        return 2
    if len(ids) == 2:
        with ws.without(ids[1]) as after:
            lp_after, rank_after = first_token_scores(after, ws.tok, facts, 64)
    else:
        lp_after, rank_after = first_token_scores(ws.model, ws.tok, facts, 64)
    ws.close()
    base, tok = models.load(args.model)[:2]  # the workspace's base model, as loaded fresh
    lp_before, rank_before = first_token_scores(base, tok, facts, 64)
    if args.dump:  # per fact, for other selections than the table's
        torch.save({"case_ids": [r["case_id"] for r in cands], "lp_before": lp_before,
                    "lp_after": lp_after, "rank_before": rank_before,
                    "rank_after": rank_after, "n_candidates": len(cands)}, args.dump)  # fmt: skip

    n = len(cands)
    top_b, top_a = rank_before == 0, rank_after == 0
    idx = torch.arange(len(facts))
    probes = {
        "shipped (1,000 in file order)": idx[:n][[r["case_id"] in shipped for r in cands]],
        "answered top-1, first 200": idx[:n][first_answered(cands, top_b[:n], 200)],
        "answered, firm (P >= 0.5)": idx[:n][top_b[:n] & (lp_before[:n].exp() >= 0.5)],
        "top-2": idx[:n][rank_before[:n] < 2],
        "top-5": idx[:n][rank_before[:n] < 5],
        "all candidates": idx[:n],
        "known_1000, first 200 (the benchmarks' check)": idx[n : n + 200],
        "known_1000, all": idx[n:],
    }
    rows, summary = [], {"workspace": args.workspace, "entry": entry.id, "probes": {}}
    for name, sel in probes.items():
        b, a = float(top_b[sel].float().mean()), float(top_a[sel].float().mean())
        dlp = float((lp_after[sel] - lp_before[sel]).mean())
        lost = int((top_b[sel] & ~top_a[sel]).sum())
        gained = int((~top_b[sel] & top_a[sel]).sum())
        summary["probes"][name] = {"n": len(sel), "before": b, "after": a, "lost": lost,
                                   "gained": gained, "logp_change": dlp}  # fmt: skip
        rows.append(f"| {name} | {len(sel)} | {100 * b:.1f} | {100 * a:.1f} | "
                    f"{100 * (a - b):+.1f} | {lost} | {gained} | "
                    f"{100 * math.expm1(dlp):+.1f} |")  # fmt: skip
    table = "\n".join([
        f"top-1 share before and after entry {entry.id} ({entry.kind})",
        "",
        "| probe | facts | before % | after % | change (points) | lost | gained "
        "| P(answer) change, geometric mean % |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip
    print(table)
    write_results(Path(args.out), summary, table, {})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
