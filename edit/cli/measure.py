"""``edit eval`` and ``edit trace``: measure edits on a data set; locate where a fact lives."""

from __future__ import annotations

from edit.atomic import check_new_folder
from edit.cli.options import (
    check_layers_fit,
    common,
    int_in,
    layer_settings,
    number,
    set_arg,
    stats_arg,
    stats_setting,
)
from edit.errors import EditError


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="edit records from a data set and measure the edits")
    p.add_argument("--data", required=True, help="CounterFact / flat CounterFact / zsRE / JSONL")
    p.add_argument("--format", default=None, help="counterfact, counterfact_flat, zsre or facts")
    p.add_argument("--method", default="rome")
    p.add_argument("--mode", default="single", help="single, sequential or batch")
    p.add_argument("--limit", type=int_in(1), default=None, help="the first N records")
    p.add_argument(
        "--out", default=None, help="result folder (default: eval-out/<data>-<method>-<mode>)"
    )
    p.add_argument("--layer", default=None, help="block(s) to edit: 4, 4,5,6 or 4-8")
    stats_arg(p)
    set_arg(p)
    p.add_argument(
        "--batch-size",
        type=int_in(1),
        default=100,
        help="sequential mode with memit/alphaedit: records per edit call (default 100)",
    )
    p.add_argument(
        "--fluency-records",
        type=int_in(0),
        default=20,
        help="single mode: records whose fluency is measured (costly on CPU)",
    )
    p.add_argument(
        "--ppl-text",
        default=None,
        help="held-out text for perplexity "
        "(default: WikiText-2 test from the repository's shared data, if present)",
    )
    common(p)
    p = sub.add_parser("trace", help="locate where a fact lives (causal tracing)")
    p.add_argument("prompt", nargs="?", help="e.g. 'The Eiffel Tower is located in'")
    p.add_argument("--subject", help="the subject, if the guess is wrong (or use [brackets])")
    p.add_argument("--target", help="the answer to trace (default: the model's prediction)")
    p.add_argument("--kind", default="all", help="all, mlp, attn or resid (default: all)")
    p.add_argument("--data", help="average over the facts of a known_1000.json-style file")
    p.add_argument("--limit", type=int_in(1), default=100, help="--data: facts to trace")
    p.add_argument("--samples", type=int_in(1), default=None, help="noise samples (10; --data: 2)")
    p.add_argument("--noise", type=number(positive=False), default=3.0,
                   help="noise std in embedding stds")  # fmt: skip
    p.add_argument("--window", type=int_in(1), default=10, help="layers restored for mlp/attn")
    p.add_argument("--seed", type=int_in(0), default=0)
    p.add_argument("--out", default="trace-out", help="folder for JSON and PNG files")
    common(p)


def cmd_eval(args) -> int:
    from pathlib import Path

    from edit import methods
    from edit.config import parse_settings
    from edit.evals.harness import EvalSettings, default_ppl_text, evaluate
    from edit.evals.report import summary_table
    from edit.models import load
    from edit.readers.records import load_records

    records = load_records(args.data, args.format, args.limit)  # input errors before loading
    # --layer wins over --set, as for edit add
    method_settings = {
        **parse_settings(args.set),
        **layer_settings(args.layer, methods.get(args.method).batch),
        **stats_setting(args),
    }
    name = Path(args.data).stem
    out = Path(args.out or f"eval-out/{name}-{args.method}-{args.mode}")
    check_new_folder(out)
    check_layers_fit(method_settings, args.model)
    model, tok = load(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    print(
        f"model: {model.edit_source}; {len(records)} {records[0].format} records from {args.data}"
    )
    settings = EvalSettings(
        fluency_records=args.fluency_records,
        ppl_text=args.ppl_text or default_ppl_text(),
        batch_size=args.batch_size,
        method_settings=method_settings,
    )
    report = evaluate(
        model,
        tok,
        records,
        method=args.method,
        mode=args.mode,
        out_dir=out,
        data_name=name,
        settings=settings,
    )
    s = report.summary
    spe = s["cost"]["seconds_per_edit"]
    print()
    print(summary_table(s))
    med = f"{spe['median']:.1f}" if spe["median"] is not None else "-"
    p90 = f"{spe['p90']:.1f}" if spe["p90"] is not None else "-"
    print(
        f"edits refused: {s['refused']}; seconds per edit: median {med}, p90 {p90}; "
        f"key statistics {s['cost']['statistics_seconds']} s; peak memory "
        f"{s['cost']['peak_memory_mb']} MB"
    )
    print(f"wrote {out}/: records.jsonl, summary.json, summary.md, scores.png, margins.png")
    return 0


def cmd_trace(args) -> int:
    from edit.methods import locate
    from edit.models import load
    from edit.readers.known import load_known

    kinds = locate.parse_kinds(args.kind)  # input errors before loading the model
    check_new_folder(args.out, may_exist=True)
    if bool(args.prompt) == bool(args.data):
        raise EditError("give a prompt to trace, or --data FILE to average over facts")
    facts = load_known(args.data) if args.data else None
    if facts is None:
        template, subject = locate.parse_prompt(args.prompt, args.subject)
    model, tok = load(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    print(f"model: {model.edit_source} ({model.edit_hash[:19]}…) on {model.device}")
    settings = dict(
        kinds=kinds, window=args.window, seed=args.seed, noise_multiplier=args.noise, progress=True
    )
    if facts is None:
        samples = locate.SAMPLES if args.samples is None else args.samples
        result = locate.trace_fact(
            model, tok, template, subject, args.target, samples=samples, **settings
        )
    else:
        samples = locate.AVERAGE_SAMPLES if args.samples is None else args.samples
        result = locate.trace_average(
            model, tok, facts, limit=args.limit, samples=samples, data=args.data, **settings
        )
    print("\n".join(result.summary()))
    paths, note = locate.write_outputs(result, args.out)
    if facts is not None and (cached := locate.save_cached(result)):
        print(
            f"cached at {cached}: ROME uses layer {result.peak_layer} for this model when it "
            f"has no tuned config"
        )
    print(f"traced in {result.seconds:.1f}s; wrote {', '.join(map(str, paths))}")
    if note:
        print(f"plots skipped: {note}")
    return 0


COMMANDS = {"eval": cmd_eval, "trace": cmd_trace}
