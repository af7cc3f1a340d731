"""Many edits on CounterFact: MEMIT batches, AlphaEdit sequences, and what they cost.

    # facts per minute for batches of 10, 100 and 1000, and one ROME edit for the ratio
    .venv/bin/python benchmarks/memit_counterfact.py speed --sizes 10,100,1000
    # ES/PS/NS (and perplexity) after one MEMIT batch of the first 100 dev records
    .venv/bin/python benchmarks/memit_counterfact.py batch --limit 100
    # 10 sequential batches of 100 from the flat CounterFact, AlphaEdit and MEMIT side by side
    .venv/bin/python benchmarks/memit_counterfact.py sequential --limit 1000 --batch-size 100

``batch`` and ``sequential`` run the evaluation harness (``edit eval``) and write its
per-record files under ``bench-out/``. Every mode writes its figures to
``benchmarks/results/memit_counterfact_<mode>.{json,md}`` (``--out``; pass another name when
trying settings, so the headline files keep the defaults' figures). Run one at a time on a
quiet machine: the figures are wall-clock times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from edit.config import parse_settings

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact"


def speed(model, tok, args) -> tuple[dict, str]:
    """ROME's median seconds per edit, then one batch per size: (summary, table)."""
    from edit import methods
    from edit.config import resolve
    from edit.readers.records import load_records

    records = load_records(args.data or DATA / "counterfact_flat.json")
    spec = methods.get(args.method)
    settings = parse_settings(args.set)
    config = resolve(spec.name, spec.config_class, model, **settings)
    # statistics and context templates are one-time costs: paid before the clock starts
    spec.compute(model, tok, [records[0].fact], config, progress=False)
    rome = methods.get("rome")
    # the settings ROME shares with the batch method (value_dtype, steps, ...) apply to it too
    shared = {k: v for k, v in settings.items() if k in rome.config_class.__dataclass_fields__}
    rome_config = resolve("rome", rome.config_class, model, **shared)
    rome_seconds = []
    for rec in records[: args.rome_edits]:
        t = time.perf_counter()
        rome.compute(model, tok, [rec.fact], rome_config, progress=False)
        rome_seconds.append(time.perf_counter() - t)
    rome_median = statistics.median(rome_seconds)
    print(f"ROME: median {rome_median:.2f} s per fact over {len(rome_seconds)} edits")
    print(f"{'batch':>6} {'seconds':>9} {'s/fact':>7} {'facts/min':>10} {'vs ROME':>8}")
    batches = {}
    for n in (int(x) for x in args.sizes.split(",")):
        facts = [r.fact for r in records[:n]]
        t = time.perf_counter()
        out = spec.compute(model, tok, facts, config, progress=not args.quiet)
        s = time.perf_counter() - t
        batches[str(n)] = {"seconds": s, "seconds_per_fact": s / n, "facts_per_minute": 60 * n / s,
                           "vs_rome": rome_median / (s / n),
                           "value_seconds": out.info["value_seconds"]}  # fmt: skip
        print(f"{n:6d} {s:9.1f} {s / n:7.2f} {60 * n / s:10.1f} {rome_median / (s / n):7.1f}x"
              f"   (value optimization {out.info['value_seconds']:.1f}s)", flush=True)  # fmt: skip
    summary = {"method": spec.name, "overrides": settings, "rome_edits": len(rome_seconds),
               "rome_seconds_per_edit": rome_median, "batches": batches}  # fmt: skip
    table = "\n".join([
        f"ROME: median {rome_median:.2f} s per edit over {len(rome_seconds)} edits", "",
        f"| {spec.name} batch | seconds | s/fact | facts/min | vs ROME |", "|---|---|---|---|---|",
        *(f"| {n} | {b['seconds']:.1f} | {b['seconds_per_fact']:.2f} | "
          f"{b['facts_per_minute']:.1f} | {b['vs_rome']:.1f}x |" for n, b in batches.items()),
    ])  # fmt: skip
    return summary, table


def harness(model, tok, args, mode: str, methods_: list[str]) -> tuple[dict, str]:
    """The evaluation harness on each method, the unedited model measured once: (summary,
    table)."""
    from benchmarks.recording import percent
    from edit.evals.harness import EvalSettings, default_ppl_text, evaluate
    from edit.evals.report import summary_table
    from edit.readers.records import load_records

    default = "counterfact_dev200.json" if mode == "batch" else "counterfact_flat.json"
    data = Path(args.data or DATA / default)
    records = load_records(data, limit=args.limit)
    unedited = None  # measured once, shared by the methods compared
    summary = {"data": data.name, "records": len(records), "mode": mode,
               "batch_size": args.batch_size, "overrides": parse_settings(args.set),
               "methods": {}}  # fmt: skip
    tables = []
    for method in methods_:
        out = ROOT / "bench-out" / f"{data.stem}-{method}-{mode}-{len(records)}{args.out_suffix}"
        settings = EvalSettings(batch_size=args.batch_size, ppl_text=default_ppl_text(),
                                fluency_records=args.fluency_records,
                                method_settings=parse_settings(args.set))  # fmt: skip
        t = time.perf_counter()
        report = evaluate(model, tok, records, method=method, mode=mode, out_dir=out,
                          data_name=data.stem, settings=settings, unedited=unedited)  # fmt: skip
        unedited = report.unedited
        s = report.summary
        print(f"\n{method} {mode}, {len(records)} records of {data.name}; results in {out}")
        print(summary_table(s))
        spe = s["cost"]["seconds_per_edit"]
        wall = time.perf_counter() - t
        print(f"seconds per fact (amortized): median {spe['median']:.2f}; wall "
              f"{wall:.0f}s", flush=True)  # fmt: skip
        summary["unedited"] = percent(s["unedited"])
        summary["methods"][method] = {
            "edited": percent(s["edited"]),
            "refused": s["refused"],
            "retried": s["retried"],
            "seconds_per_fact_median": spe["median"],
            "wall_seconds": wall,
            "eval_folder": str(out.relative_to(ROOT)),
        }
        tables.append(summary_table(s))
    return summary, "\n".join(tables)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["speed", "batch", "sequential"])
    p.add_argument("--data", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--method", default="memit", help="speed: the batch method timed")
    p.add_argument("--methods", default="alphaedit,memit", help="sequential: methods compared")
    p.add_argument("--sizes", default="10,100,1000")
    p.add_argument("--rome-edits", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--fluency-records", type=int, default=20, help="records whose generation "
                   "prompts measure fluency after the edits")  # fmt: skip
    p.add_argument("--out-suffix", default="", help="appended to the result folder's name")
    p.add_argument("--model", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default=None, help="results file stem (<out>.json, <out>.md); "
                   "default benchmarks/results/memit_counterfact_<mode>")  # fmt: skip
    args = p.parse_args(argv)
    out = args.out or ROOT / "benchmarks" / "results" / f"memit_counterfact_{args.what}"

    import edit
    from benchmarks.recording import write_results

    model, tok = edit.load(args.model)
    print(f"model {model.edit_source}; overrides {parse_settings(args.set)}")
    if args.what == "speed":
        summary, table = speed(model, tok, args)
    elif args.what == "batch":
        args.limit = args.limit or 100
        summary, table = harness(model, tok, args, "batch", [args.method])
    else:
        args.limit = args.limit or 1000
        summary, table = harness(model, tok, args, "sequential", args.methods.split(","))
    write_results(out, summary, table, {})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
