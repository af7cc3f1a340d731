"""Reverting edits in the middle of a long ledger: do the edits made after them still take?

    .venv/bin/python benchmarks/middle_revert.py --work bench-out/lifelong-1000 \
        --revert 10 --out benchmarks/results/middle_revert_1000

Takes the workspace of a lifelong run (``benchmarks/lifelong.py``; the run's own workspace
is left as it is: a copy is reverted), reverts ``--revert`` consecutive entries from the
middle of its ledger, and measures, before and after, on the same records: ES and PS of the
reverted facts (after the revert they should be back at the unedited model's), of every
edit made after them (they were computed on a model that held the reverted ones), and of a
sample of the edits made before; NS of the kept edits; WikiText-2 perplexity. Each revert
rebuilds the weights from the base and the remaining entries (``Workspace.revert``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    args = _parser().parse_args()
    from benchmarks.lifelong import averages, log, scores
    from benchmarks.recording import write_results
    from edit.api.workspace import Workspace
    from edit.evals.fluency import perplexity
    from edit.evals.harness import default_ppl_text
    from edit.readers.records import load_records

    work = Path(args.work)
    state = json.loads((work / "state.json").read_text())
    records = load_records(state["settings"]["data"], limit=state["next"])
    by_fact = {(r.fact.prompt, r.fact.subject, r.fact.target): r for r in records}
    ppl_text = Path(default_ppl_text()).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(dir=ROOT / "bench-out") as tmp:
        copy = Path(shutil.copytree(work / "ws", Path(tmp) / "ws"))
        ws = Workspace.open(copy)
        entries = ws.entries()
        gone, after, before = split(entries, args.revert, args.sample)

        def recs(group):
            return [by_fact[(f.prompt, f.subject, f.target)] for e in group for f in e.facts]

        sets = {"reverted": recs(gone), "made after": recs(after), "made before": recs(before)}
        log(f"{len(entries)} entries; reverting {gone[0].id}..{gone[-1].id}; measuring "
            f"{', '.join(f'{len(v)} {k}' for k, v in sets.items())}")  # fmt: skip
        table = {}
        for when in ("before", "after"):
            if when == "after":
                t = time.perf_counter()
                for e in gone:
                    ws.revert(e.id)
                revert_s = (time.perf_counter() - t) / len(gone)
                log(f"reverted {len(gone)} entries, {revert_s:.2f} s each")
            table[when] = {name: averages(scores(ws.model, ws.tok, rs), [r.id for r in rs])
                           for name, rs in sets.items()}  # fmt: skip
            table[when]["ppl"] = perplexity(ws.model, ws.tok, ppl_text)
            log(f"{when} the revert: {json.dumps(table[when])}")
    unedited = state["unedited"]["scores"]
    probed = [r.id for r in sets["reverted"] if r.id in unedited]
    table["unedited"] = {"reverted": averages(unedited, probed) if probed else None,
                         "ppl": state["unedited"]["ppl"]}  # fmt: skip
    summary = {"entries": len(entries), "reverted": len(gone), "revert_s": revert_s,
               **{f"{when}_{name}_{k}": v for when in ("before", "after")
                  for name in sets for k, v in table[when][name].items()},
               "before_ppl": table["before"]["ppl"],
               "after_ppl": table["after"]["ppl"]}  # fmt: skip
    rows = ["| records | before the revert: ES / PS / NS | after: ES / PS / NS |",
            "|---|---|---|"]  # fmt: skip
    for name, rs in sets.items():
        b, a = table["before"][name], table["after"][name]
        rows.append(f"| {name} ({len(rs)}) | {b['ES']:.1f} / {b['PS']:.1f} / {b['NS']:.1f} | "
                    f"{a['ES']:.1f} / {a['PS']:.1f} / {a['NS']:.1f} |")  # fmt: skip
    rows.append(f"| WikiText-2 perplexity | {table['before']['ppl']:.2f} | "
                f"{table['after']['ppl']:.2f} |")  # fmt: skip
    text = (f"Entries {gone[0].id}–{gone[-1].id} of {len(entries)} reverted, "
            f"{revert_s:.2f} s each. "
            + (f"The unedited model on the reverted facts ({len(probed)} probed): ES "
               f"{table['unedited']['reverted']['ES']:.1f} / PS "
               f"{table['unedited']['reverted']['PS']:.1f}; " if probed else "")
            + f"perplexity {table['unedited']['ppl']:.2f}.\n\n" + "\n".join(rows))  # fmt: skip
    write_results(args.out, summary, text, {"table": table, "work": str(work)})


def split(entries: list, revert: int, sample: int) -> tuple[list, list, list]:
    """(``revert`` consecutive entries from the middle, at most ``sample`` made right after
    them, at most ``sample`` made first)."""
    if not 0 < revert < len(entries):
        sys.exit(f"error: --revert {revert}: the ledger holds {len(entries)} entries")
    middle = max(0, len(entries) // 2 - revert // 2)
    gone = entries[middle : middle + revert]
    return gone, entries[middle + revert :][:sample], entries[:middle][:sample]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="a lifelong run's folder (state + ws)")
    p.add_argument("--revert", type=int, default=10, help="consecutive entries to revert")
    p.add_argument("--sample", type=int, default=200,
                   help="entries measured on each side of the reverted ones, at most")  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "middle_revert"))
    return p


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
