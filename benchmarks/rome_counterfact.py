"""ROME single edits on CounterFact: efficacy, generalization, locality, and cost.

A thin front to the evaluation harness (``edit eval``), fluency (generation entropy,
WikiText-2 perplexity) measured on the first ``--fluency-records`` records right after each
one's own edit (0: none, for quick comparisons of settings):

    .venv/bin/python benchmarks/rome_counterfact.py --limit 50
    .venv/bin/python benchmarks/rome_counterfact.py --limit 10 --set layer=6 --set steps=15
    .venv/bin/python benchmarks/rome_counterfact.py --limit 1 --fresh-stats   # statistics time

Writes ``benchmarks/results/rome_counterfact.{json,md}`` (``--out``; pass another name when
trying settings, so the headline file keeps the defaults' figures).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_dev200.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--model", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a ROME setting, e.g. layer=6")  # fmt: skip
    p.add_argument("--fresh-stats", action="store_true", help="measure statistics in a new cache")
    p.add_argument("--fluency-records", type=int, default=10,
                   help="records whose fluency (generation entropy, WikiText-2 perplexity) is "
                   "measured right after their own edit")  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rome_counterfact"),
                   help="results file stem: <out>.json and <out>.md")  # fmt: skip
    args = p.parse_args(argv)
    if args.fresh_stats:
        os.environ["EDIT_STATS_CACHE"] = tempfile.mkdtemp(prefix="edit-stats-")

    import edit
    from benchmarks.recording import percent, write_results
    from edit.config import parse_settings
    from edit.evals.harness import EvalSettings, default_ppl_text, evaluate
    from edit.evals.report import summary_table
    from edit.readers.records import load_records

    overrides = parse_settings(args.set)
    model, tok = edit.load(args.model)
    records = load_records(args.data, limit=args.limit)
    settings = EvalSettings(fluency_records=args.fluency_records, ppl_text=default_ppl_text(),
                            method_settings=overrides)  # fmt: skip
    report = evaluate(model, tok, records, method="rome", mode="single", settings=settings,
                      data_name=Path(args.data).stem)  # fmt: skip
    s = report.summary
    spe = s["cost"]["seconds_per_edit"]
    print(f"\nmodel {model.edit_source}; {len(records)} records; overrides {overrides}")
    print(summary_table(s))
    if spe["median"] is not None:
        print(f"seconds per edit: median {spe['median']:.1f}, p90 {spe['p90']:.1f}; "
              f"edits refused: {s['refused']}")  # fmt: skip
    print(f"key statistics: {s['cost']['statistics_seconds']:.1f}s")
    summary = {
        "data": Path(args.data).name,
        "records": len(records),
        "overrides": overrides,
        "unedited": percent(s["unedited"]),
        "edited": percent(s["edited"]),
        "refused": s["refused"],
        "retried": s["retried"],
        "seconds_per_edit_median": spe["median"],
        "seconds_per_edit_p90": spe["p90"],
        "statistics_seconds": s["cost"]["statistics_seconds"],
    }
    write_results(args.out, summary, summary_table(s), {"harness_summary": s})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
