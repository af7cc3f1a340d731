"""Audit the TOFU unlearning runs: `edit audit` on each forget method.

    .venv/bin/python benchmarks/tofu_audit.py --run bench-out/tofu     # after tofu_unlearn.py

Uses the two workspaces a `tofu_unlearn.py` run saved (``ws-target``: the default model that
learned forget10; ``ws-reference``: the one that learned only the QA outside the run's split,
forget01 or forget05). For each method: `forget` the split from the target with that run's
settings, holdout and reference (its summary.json), audit the entry against the reference,
revert it. The audit is the library's (`edit.evals.audit.audit`, what `edit audit` runs)
with:

* forget: the split's QA (with perturbed answers, so forget quality is TOFU's KS test on
  truth ratios);
* holdout: as many QA of fictitious authors from ``retain90.json`` that neither model ever
  learned (same kind of text, never seen), for the membership-inference AUCs;
* attacks: 8- and 4-bit RTN quantization, and relearning (``--relearn``) on 32 QA of the
  retained authors (related data, Deeb & Roger 2024) or on shipped WikiText-2 (unrelated);
  each also run on the reference, and only the excess over what it gives the reference
  counts as recovery.

Also a null check of the membership scores on the real model: the AUC between two halves of
200 more never-seen QA from retain90 (alternate questions, so both halves cover the same ten
authors) should be 0.5 up to sampling noise (standard error about 0.04 at 100 vs 100).

Writes ``<reports>/<method>/report.{json,md,png}``, ``<reports>/holdout.json`` and
``<reports>/summary.{json,md}``, with the wall time of every forget and audit, and the
figures to ``benchmarks/results/tofu_audit.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from edit.config import parse_settings

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tofu"
RELEARN = 32  # retained QA the related relearning attack trains on
NULL = 200  # never-seen QA for the null check, split in alternate halves


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def null_auc(model, tok, a: list, b: list) -> dict[str, float]:
    """Membership AUCs between two samples of never-seen text (should be about 0.5)."""
    from edit.evals import mia

    return mia.aucs(mia.token_stats(model, tok, a), mia.token_stats(model, tok, b))


def main() -> None:
    args = _parser().parse_args()
    from benchmarks.tofu_unlearn import aim_for
    from edit.api.workspace import Workspace

    t_all = time.perf_counter()
    run, data = Path(args.run), Path(args.data)
    if not (run / "ws-target" / "workspace.json").is_file():
        raise SystemExit(f"{run} has no ws-target workspace: run benchmarks/tofu_unlearn.py first")
    if not data.is_dir():
        raise SystemExit(f"TOFU data not found at {data}: pass --data")
    ran = json.loads((run / "summary.json").read_text())["settings"]
    settings = ran["forget"]
    settings.update(parse_settings(args.set))  # KEY=VALUE as `edit forget --set` reads it
    out = Path(args.reports) if args.reports else run / "audit"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    split = ran.get("split", "forget01")
    forget10, forget, kept, null, examples = _audit_sets(data, split, args.relearn, out)

    ref = Workspace.open(run / "ws-reference", create=False)
    ws = Workspace.open(run / "ws-target", create=False)
    # the holdout and reference the run's forgets were given
    holdout = ran.get("holdout", 0) if args.holdout is None else args.holdout
    aim = aim_for(data, forget10, holdout, ran.get("reference", "none"), ref.model)
    summary: dict = {"settings": settings, "split": split, "aim": sorted(aim),
                     "relearn": args.relearn, "command": " ".join(sys.argv),
                     "runs": {}}  # fmt: skip
    summary["null_auc"] = _null_check(ws, null)
    log(f"null check (unseen vs unseen): {summary['null_auc']['auc']}")
    for method in args.methods.split(","):
        summary["runs"][method] = _forget_and_audit(
            ws,
            ref,
            method,
            settings,
            aim,
            forget,
            kept,
            examples,
            [a for a in args.attacks.split(",") if a not in ("", "none")],
            out,
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _finish(summary, out, args.out, t_all)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=str(ROOT / "bench-out" / "tofu"),
                   help="a tofu_unlearn.py --out folder")  # fmt: skip
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--reports", default=None, help="audit reports folder (default <run>/audit)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tofu_audit"),
                   help="results file stem: <out>.json and <out>.md")  # fmt: skip
    p.add_argument("--methods", default="npo,graddiff")
    p.add_argument("--attacks", default="quantize,relearn", help="quantize, relearn or none")
    p.add_argument("--relearn", choices=("related", "wikitext"), default="related",
                   help="what the relearning attack trains on: QA of the retained authors "
                   "(related, the harder attack) or shipped WikiText-2 (unrelated)")  # fmt: skip
    p.add_argument("--holdout", type=int, default=None,
                   help="never-seen QA given to each forget as its holdout (default: the "
                   "run's --holdout; never the audit's own holdout QA)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a forget setting of the run (JSON): kl_weight=1")  # fmt: skip
    return p


def _audit_sets(data: Path, split: str, relearn: str, out: Path) -> tuple:
    """forget10, the split, the kept QA of forget10 (the retain set), the never-seen QA of
    the null check, and the audit's data: the split against as many never-seen QA (written
    to ``<out>/holdout.json``), and for ``relearn="related"`` the relearning sample,
    :data:`RELEARN` retained QA spread over the kept authors (every model learned them)."""
    from benchmarks.tofu_unlearn import read_split, unseen_qa
    from edit.evals import audit

    forget10, forget, kept = read_split(data, split)
    unseen = unseen_qa(data, forget10, len(forget) + NULL)
    holdout, null = unseen[: len(forget)], unseen[len(forget) :]
    (out / "holdout.json").write_text(json.dumps(
        [{"question": q.question, "answer": q.answer} for q in holdout], indent=1))  # fmt: skip
    related = kept[:: max(1, len(kept) // RELEARN)][:RELEARN] if relearn == "related" else None
    examples = audit.AuditData(
        forget=[q.example() for q in forget],
        holdout=[q.example() for q in holdout],
        qa=forget,
        relearn=[q.example() for q in related] if related else None,
    )
    return forget10, forget, kept, null, examples


def _null_check(ws, null: list) -> dict:
    """Membership AUCs between the alternate halves of ``null`` on the target model."""
    t = time.perf_counter()
    return {
        "what": f"{NULL // 2} vs {NULL // 2} never-seen TOFU QA on the target model",
        "auc": null_auc(
            ws.model, ws.tok, [q.example() for q in null[::2]], [q.example() for q in null[1::2]]
        ),
        "seconds": time.perf_counter() - t,
    }


def _forget_and_audit(ws, ref, method: str, settings: dict, aim: dict, forget: list,
                      kept: list, examples, attacks: list[str], out: Path) -> dict:  # fmt: skip
    """`forget` the split from the target with ``method`` (and ``aim``'s holdout and
    reference), audit the entry against the reference (report written to
    ``<out>/<method>``), revert it: its times and figures."""
    from edit.evals import audit

    log(f"forget {len(forget)} QA with {method} ({settings}; aim: {', '.join(aim) or 'none'})")
    t = time.perf_counter()
    entry = ws.forget([q.example() for q in forget], [q.example() for q in kept],
                      method=method, **aim, **settings).entry  # fmt: skip
    forget_s = time.perf_counter() - t
    log(f"  {forget_s:.0f} s; auditing entry {entry.id}")
    t = time.perf_counter()
    try:
        report = audit.audit(ws, entry.id, examples, reference=ref.model, reference_tok=ref.tok,
                             attack_names=tuple(attacks))  # fmt: skip
    finally:
        audit_s = time.perf_counter() - t
        ws.revert(entry.id)
    audit.write(report, out / method)
    log(f"  audit {audit_s:.0f} s")
    for v in report.verdicts:
        log(f"    {v}")
    return {"forget_seconds": forget_s, "audit_seconds": audit_s, "verdicts": report.verdicts,
            **figures(report)}  # fmt: skip


def _finish(summary: dict, out: Path, results_stem: str, t_all: float) -> None:
    """The final summary.json and summary.md in ``out``, printed, and the results file."""
    summary["wall_seconds"] = time.perf_counter() - t_all
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    md = markdown(summary, out)
    (out / "summary.md").write_text(md)
    print(md)
    log(f"wrote {out}; total {summary['wall_seconds'] / 60:.1f} min")
    from benchmarks.recording import write_results

    write_results(results_stem, summary, md, {})


SCALARS = ("forget_nll", "forget_prob", "holdout_nll", "mia_auc", "forget_quality",
           "extraction_rouge_l", "extraction_exact", "recovered_percent",
           "extraction_recovered_percent")  # fmt: skip


def figures(report) -> dict:
    """Each model's and attack's figures of an audit report (no per-example lists), and
    which checks passed."""

    def pick(m: dict) -> dict:
        return {k: m[k] for k in SCALARS if k in m}

    return {
        "passed": dict(report.passed),
        "models": {name: pick(m) for name, m in report.models.items()},
        "attacks": {name: pick(m) for name, m in report.attacks.items()},
    }


def markdown(summary: dict, out: Path) -> str:
    null = summary["null_auc"]
    lines = [
        "# TOFU audit",
        "",
        f"Null check ({null['what']}): "
        + ", ".join(f"{k} {v:.3f}" for k, v in null["auc"].items()),
        "",
    ]
    for method, r in summary["runs"].items():
        lines += [f"## {method}: forget {r['forget_seconds']:.0f} s, audit "
                  f"{r['audit_seconds'] / 60:.1f} min", ""]  # fmt: skip
        lines += (out / method / "report.md").read_text().splitlines()[2:]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
