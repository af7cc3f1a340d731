"""The ``edit`` command line: a thin shell over the Python API.

edit add "Paris is capital of Italy"
edit ask "Paris is the capital of"
edit erase "The Eiffel Tower is located in Paris"
edit log | edit revert 0001 | edit export merged/ | edit verify

Every refusal is one ``error: ...`` line on stderr and exit status 2, and nothing is
written: option values are checked before any model is loaded or any file is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence

from edit import distributed
from edit.atomic import check_new_folder
from edit.errors import EditError

MAX_PROMPT_CHARS = 4000


class _UsageError(EditError):
    """A command line that argparse cannot read."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, like every other refusal
    (its default prints the usage block and exits on its own)."""

    def error(self, message: str):
        raise _UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in lo..hi."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {value}")
        return value

    return parse


def _number(positive: bool):
    """An argparse type: a finite float, > 0 (``positive``) or >= 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'> 0' if positive else '>= 0'}, got {text}"
            )
        return value

    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workspace",
        "-w",
        default=os.environ.get("EDIT_WORKSPACE", "edit-workspace"),
        help="ledger folder (default: $EDIT_WORKSPACE or ./edit-workspace)",
    )
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="HF id, model folder or .gguf file (default: the workspace's base model, "
        "else the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p.add_argument(
        "--device-map",
        default=None,
        type=_device_map,
        help="accelerate's layer placement: auto (GPUs, then CPU memory, then disk), "
        "balanced, sequential, or JSON {module: device} (default: auto on CUDA)",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="log what happens inside")


def _device_map(text: str) -> str | dict:
    if not text.lstrip().startswith("{"):
        return text
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not a JSON object ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("give a JSON object {module: device}")
    return value


def _edit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "statement",
        nargs="?",
        help="e.g. 'Paris is capital of Italy' or '[Paris] is capital of [Italy]'",
    )
    p.add_argument(
        "--file",
        help="many facts in one batch: JSON Lines of {'statement': ...} or "
        "{'prompt', 'subject', 'target'} (or a CounterFact / zsRE file)",
    )
    p.add_argument("--subject", help="the subject, if the parse guesses wrong")
    p.add_argument("--target", help="the object at the end of the statement")
    p.add_argument(
        "--method",
        default=None,
        help="rome, memit or alphaedit (default: rome for one fact; for --file, memit on an "
        "empty workspace, else alphaedit)",
    )
    p.add_argument(
        "--layer",
        default=None,
        help="block(s) to edit: 4 (rome), 4,5,6 or 4-8 (memit, alphaedit); default: tuned config",
    )
    p.add_argument("--steps", type=_int_in(1, 100_000), default=None, help="max optimization steps")
    _stats_arg(p)
    _set_arg(p)


def _stats_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stats-corpus",
        default=None,
        help="text for the key statistics: a .txt, .jsonl or .parquet file ('text' column) or "
        "a datasets name NAME[:CONFIG[:SPLIT]] (default: the shipped WikiText-2)",
    )


def _stats_setting(args) -> dict:
    """``--stats-corpus`` as the method's setting, checked before the model is loaded."""
    if getattr(args, "stats_corpus", None) is None:
        return {}
    from edit.readers.text import text_source

    text_source(args.stats_corpus)  # a missing file: one line, now
    return {"stats_corpus": args.stats_corpus}


def _set_arg(p: argparse.ArgumentParser, what: str = "a setting of the method's config, e.g. "
             "stop_most_probable=true or cov_weight=2000") -> None:  # fmt: skip
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help=f"{what} (repeatable)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edit", description="Change what a language model knows.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("add", help="insert or change a fact (ROME)")
    _edit_args(p)
    _common(p)
    p = sub.add_parser("erase", help="make the model stop asserting a fact")
    _edit_args(p)
    _common(p)
    p = sub.add_parser("ask", help="what does the (edited) model say?")
    p.add_argument("prompt")
    p.add_argument("--top", type=_int_in(1, 1000), default=5, help="how many next-token candidates")
    p.add_argument("--tokens", type=_int_in(1, 4096), default=None,
                   help="length of the greedy completion (default 12; 48 with --chat)")  # fmt: skip
    p.add_argument("--chat", action="store_true",
                   help="ask PROMPT as a user turn of the model's chat template")  # fmt: skip
    _common(p)
    p = sub.add_parser("eval", help="edit records from a data set and measure the edits")
    p.add_argument("--data", required=True, help="CounterFact / flat CounterFact / zsRE / JSONL")
    p.add_argument("--format", default=None, help="counterfact, counterfact_flat, zsre or facts")
    p.add_argument("--method", default="rome")
    p.add_argument("--mode", default="single", help="single, sequential or batch")
    p.add_argument("--limit", type=_int_in(1), default=None, help="the first N records")
    p.add_argument(
        "--out", default=None, help="result folder (default: eval-out/<data>-<method>-<mode>)"
    )
    p.add_argument("--layer", default=None, help="block(s) to edit: 4, 4,5,6 or 4-8")
    _stats_arg(p)
    _set_arg(p)
    p.add_argument(
        "--batch-size",
        type=_int_in(1),
        default=100,
        help="sequential mode with memit/alphaedit: records per edit call (default 100)",
    )
    p.add_argument(
        "--fluency-records",
        type=_int_in(0),
        default=20,
        help="single mode: records whose fluency is measured (costly on CPU)",
    )
    p.add_argument(
        "--ppl-text",
        default=None,
        help="held-out text for perplexity "
        "(default: WikiText-2 test from the repository's shared data, if present)",
    )
    _common(p)
    p = sub.add_parser("trace", help="locate where a fact lives (causal tracing)")
    p.add_argument("prompt", nargs="?", help="e.g. 'The Eiffel Tower is located in'")
    p.add_argument("--subject", help="the subject, if the guess is wrong (or use [brackets])")
    p.add_argument("--target", help="the answer to trace (default: the model's prediction)")
    p.add_argument("--kind", default="all", help="all, mlp, attn or resid (default: all)")
    p.add_argument("--data", help="average over the facts of a known_1000.json-style file")
    p.add_argument("--limit", type=_int_in(1), default=100, help="--data: facts to trace")
    p.add_argument("--samples", type=_int_in(1), default=None, help="noise samples (10; --data: 2)")
    p.add_argument("--noise", type=_number(positive=False), default=3.0,
                   help="noise std in embedding stds")  # fmt: skip
    p.add_argument("--window", type=_int_in(1), default=10, help="layers restored for mlp/attn")
    p.add_argument("--seed", type=_int_in(0), default=0)
    p.add_argument("--out", default="trace-out", help="folder for JSON and PNG files")
    _common(p)
    for name, what in (("forget", "unlearn a corpus (LoRA)"), ("learn", "learn a corpus (LoRA)")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--corpus", required=True, help="JSON Lines: {'text'}, {'question', "
                       "'answer'} or {'prompt', 'completion'} per line")  # fmt: skip
        if name == "forget":
            p.add_argument("--retain", help="examples to keep (default: shipped WikiText-2 text)")
            p.add_argument("--method", default=None, help="npo (default), graddiff, "
                           "gradascent or simnpo")  # fmt: skip
            p.add_argument("--holdout", help="never-seen examples of the same kind: reported "
                           "beside the corpus, and training stops once the corpus's NLL "
                           "reaches theirs")  # fmt: skip
        # the defaults are methods.unlearn.OBJECTIVE_DEFAULTS (not imported here: no torch)
        epochs, lr = (
            ("20; a stop level may end it sooner", "2e-4") if name == "forget" else ("5", "3e-4")
        )
        p.add_argument("--epochs", type=_int_in(1), default=None, help=f"passes over the corpus "
                       f"(default {epochs})")  # fmt: skip
        p.add_argument("--lr", type=_number(positive=True), default=None,
                       help=f"AdamW learning rate (default {lr})")  # fmt: skip
        p.add_argument("--lora-rank", type=_int_in(1), default=None)
        _set_arg(p, "any other setting of edit.methods.unlearn.UnlearnConfig, e.g. kl_weight=5 "
                 "or retain_batch_size=16")  # fmt: skip
        _common(p)
    p = sub.add_parser("audit", help="prove a forget / erase entry: MIA, extraction, attacks")
    p.add_argument("id", nargs="?", help="the entry to audit (default: the last one)")
    p.add_argument("--forget", help="the forgotten examples (JSONL / TOFU JSON; default for an "
                   "erase entry: its facts)")  # fmt: skip
    p.add_argument("--holdout", help="text of the same kind the model never saw (for MIA)")
    p.add_argument("--reference", help="a workspace folder or model that never saw the forget "
                   "set (for forget quality and privacy leakage)")  # fmt: skip
    p.add_argument("--attacks", default="quantize,relearn", help="quantize, relearn or none")
    p.add_argument("--relearn", help="relearning sample (default: shipped WikiText-2 slices)")
    p.add_argument("--gen-tokens", type=_int_in(1, 4096), default=32,
                   help="greedy tokens for extraction")  # fmt: skip
    p.add_argument("--out", default=None, help="report folder (default: audit-out/<id>)")
    _common(p)
    p = sub.add_parser("log", help="list the edits in the workspace")
    _common(p)
    p = sub.add_parser("revert", help="undo an edit exactly")
    p.add_argument("id")
    _common(p)
    p = sub.add_parser("export", help="write base + edits as a Hugging Face model folder")
    p.add_argument("dir")
    _common(p)
    p = sub.add_parser("verify", help="check the ledger: every entry, hash and manifest line")
    _common(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _quiet_libraries(args.verbose)
    try:
        distributed.check_launch()  # a launch this machine cannot serve: one line, now
        if distributed.launched():  # accelerate launch: one process per device
            device = distributed.init()
            if args.device is None:
                args.device = str(device)
            if not distributed.is_main():
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115  one report, from the main one
        with contextlib.ExitStack() as args.cleanup:  # closes the workspaces opened
            return COMMANDS[args.command](args)
    except EditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was recorded", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not the user's input: one line, the traceback on request
        if args.verbose:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"error: unexpected {type(e).__name__}: {first} (this is a bug in edit; "
              f"run again with --verbose for the traceback)", file=sys.stderr)  # fmt: skip
        return 2


def _quiet_libraries(verbose: bool) -> None:
    """What this library does (statistics collected, config used) is reported on stdout;
    its warnings, and other libraries' chatter (Hub retries, deprecations) only with
    --verbose, so that a refusal is the one line on stderr."""
    to_stdout = logging.StreamHandler(sys.stdout)
    to_stdout.addFilter(lambda record: record.levelno < logging.WARNING)
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(logging.WARNING)
    for h in (to_stdout, to_stderr):
        h.setFormatter(logging.Formatter("%(message)s"))
    ours = logging.getLogger("edit")
    ours.handlers = [to_stdout, to_stderr]
    ours.propagate = False
    ours.setLevel(logging.INFO)
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, format="%(message)s")
    if verbose:
        return
    warnings.simplefilter("ignore")
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()


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
    layer_settings = {
        **parse_settings(args.set),
        **_layer_settings(args.layer, methods.get(args.method).batch),
        **_stats_setting(args),
    }
    name = Path(args.data).stem
    out = Path(args.out or f"eval-out/{name}-{args.method}-{args.mode}")
    check_new_folder(out)
    model, tok = load(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    print(
        f"model: {model.edit_source}; {len(records)} {records[0].format} records from {args.data}"
    )
    settings = EvalSettings(
        fluency_records=args.fluency_records,
        ppl_text=args.ppl_text or default_ppl_text(),
        batch_size=args.batch_size,
        method_settings=layer_settings,
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
    from edit import locate
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


def _open(args, create: bool = True, writer: bool = False, dropping: str | None = None):
    """The workspace with its model; a writer holds the workspace's lock until it exits (in
    data-parallel runs the main process, which alone writes)."""
    from edit.workspace import Workspace

    ws = Workspace.open(args.workspace, model_name=args.model, create=create,
                        exclusive=writer and distributed.is_main(), dropping=dropping,
                        device=args.device, dtype=args.dtype,
                        device_map=args.device_map)  # fmt: skip
    args.cleanup.callback(ws.close)
    return ws


def _base_model_line(ws) -> str:
    dtype = str(ws.model.dtype).removeprefix("torch.")
    return f"model: {ws.base['source']} ({ws.base['hash'][:19]}…) on {ws.model.device}/{dtype}"


def _layer_settings(text: str | None, batch: bool) -> dict:
    """``--layer`` as the method's setting: ``layer=4`` (ROME) or ``layers=(4, 5, 6)``."""
    if text is None:
        return {}
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            if not 0 <= lo <= hi < lo + 1000:
                raise ValueError
            layers = tuple(range(lo, hi + 1))
        else:
            layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise EditError(
            f"--layer {text!r}: give a block index (4), a list (4,5,6) or a range (4-8)"
        ) from None
    if not batch:
        if len(layers) != 1:
            raise EditError(f"--layer {text!r}: this method edits one layer; give one index")
        return {"layer": layers[0]}
    return {"layers": layers}


def cmd_add(args, erase: bool = False) -> int:
    from edit import methods
    from edit.api import as_fact
    from edit.config import check_settings, parse_settings

    if args.file and args.statement is not None:
        raise EditError("give a statement or --file, not both")
    if args.file:
        from edit.readers.records import load_records

        facts = [r.fact for r in load_records(args.file)]  # every line checked before loading
        print(f"read {len(facts)} fact{'s' * (len(facts) != 1)} from {args.file}")
        request = facts
    elif args.statement is not None:
        fact = as_fact(args.statement, args.subject, args.target)  # parse errors before loading
        print(f"parsed: subject={fact.subject!r}  prompt={fact.prompt!r}  target={fact.target!r}")
        request = fact
    else:
        raise EditError(
            "nothing to edit: give a statement, e.g. 'Paris is capital of Italy', or --file"
        )
    batch = isinstance(request, list)
    # the default method for a batch is a batch method, for one fact ROME
    layers = _layer_settings(args.layer, methods.get(args.method).batch if args.method else batch)
    settings = {**parse_settings(args.set), **layers, **_stats_setting(args)}  # flags win
    if args.steps is not None:
        settings["steps"] = args.steps
    spec = methods.get(args.method or ("memit" if batch else "rome"))
    check_settings(spec.name, spec.config_class, settings)  # bad values before loading
    ws = _open(args, writer=True)
    print(_base_model_line(ws))
    n = len(ws.entries())
    if n:
        print(f"workspace: {ws.path} ({n} earlier edit{'s' * (n != 1)} applied)")
    t0 = time.perf_counter()
    entry, res = ws.add(
        request,
        method=args.method or ws.default_method(batch),
        erase=erase,
        **settings,
    )
    if batch:
        _print_batch(res, erase, time.perf_counter() - t0)
    else:
        _print_single(res, erase, time.perf_counter() - t0)
    print(f"recorded: {entry.path} (id {entry.id}); undo with 'edit revert {entry.id}'")
    return 0


def _print_single(res, erase: bool, seconds: float) -> None:
    fact, m, info = res.facts[0], res.metrics, res.info
    verb = "erased" if erase else "edited"
    where = info.get("module") or ", ".join(info.get("modules", []))
    print(
        f"{verb} with {res.method.upper()} at layer {', '.join(map(str, res.layers))} "
        f"({where}): {info['steps']} steps, loss {info['loss_start']:.3f} -> "
        f"{info['loss_end']:.3f}, {seconds:.1f}s"
    )
    rows = []
    if not erase:
        rows.append((f"P({fact.target!r}) new", m["p_new_before"], m["p_new_after"]))
    label = "object" if erase else "old"
    rows.append((f"P({m['old_target']!r}) {label}", m["p_old_before"], m["p_old_after"]))
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'':{width}}{'before':>10}{'after':>10}")
    for name, b, a in rows:
        print(f"{name:{width}}{b:10.4f}{a:10.4f}")
    print(f"greedy before: {fact.text!r} -> {m['completion_before']!r}")
    print(f"greedy after:  {fact.text!r} -> {m['completion_after']!r}")
    if any(r["kept"] for r in m.get("retried", [])):
        print("the first update did not take; a second one on top of it did (both recorded)")


def _print_batch(res, erase: bool, seconds: float) -> None:
    m, info = res.metrics, res.info
    n = m["facts"]
    verb = "erased" if erase else "edited"
    print(
        f"{verb} {n} facts in one {res.method.upper()} update of layers "
        f"{', '.join(map(str, res.layers))}: {m['took']}/{n} took; value loss "
        f"{info['loss_start']:.3f} -> {info['loss_end']:.3f} (at most {info['steps']} steps); "
        f"{seconds:.1f}s ({60 * n / seconds:.1f} facts per minute)"
    )

    def mean(key: str) -> float:
        vals = [f[key] for f in m["per_fact"] if f.get(key) is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    rows = [] if erase else [("mean P(new)", mean("p_new_before"), mean("p_new_after"))]
    rows.append(
        (f"mean P({'object' if erase else 'old'})", mean("p_old_before"), mean("p_old_after"))
    )
    print(f"{'':16}{'before':>10}{'after':>10}")
    for name, b, a in rows:
        print(f"{name:16}{b:10.4f}{a:10.4f}")
    for r in m.get("retried", []):
        print(
            f"edited again the {r['facts']} that did not take: {r['took']} took"
            + ("" if r["kept"] else " (no better: that round was dropped)")
        )
    for line in m["not_taken"][:5]:
        print(f"did not take: {line}")
    if len(m["not_taken"]) > 5:
        print(f"... and {len(m['not_taken']) - 5} more (see 'edit log')")


def cmd_erase(args) -> int:
    return cmd_add(args, erase=True)


def cmd_train(args) -> int:
    from edit.config import parse_settings
    from edit.evals.fluency import heldout_text, perplexity
    from edit.readers.corpus import read_corpus

    forget = args.command == "forget"
    extra = parse_settings(args.set)
    data = read_corpus(args.corpus)  # input errors before loading
    retain = read_corpus(args.retain) if forget and args.retain else None
    holdout = read_corpus(args.holdout) if forget and args.holdout else None
    print(f"read {len(data)} examples from {args.corpus}"
          + (f", {len(retain)} to retain from {args.retain}" if retain else "")
          + (f", {len(holdout)} never-seen from {args.holdout}" if holdout else ""))  # fmt: skip
    flags = {"epochs": args.epochs, "lr": args.lr, "lora_rank": args.lora_rank}
    settings = {**extra, **{k: v for k, v in flags.items() if v is not None}}
    if forget:
        settings["method"] = args.method
    from edit.config import check_settings
    from edit.methods.unlearn import UnlearnConfig

    check_settings("unlearn", UnlearnConfig, settings)  # bad values before loading
    ws = _open(args, writer=True)
    print(_base_model_line(ws))
    heldout = heldout_text()

    def ppl() -> float:
        return perplexity(ws.model, ws.tok, heldout)

    ppl_before = ppl()
    if forget:
        entry, res = ws.forget(args.corpus, args.retain, holdout=args.holdout, **settings)
    else:
        entry, res = ws.learn(args.corpus, **settings)
    m = res.metrics
    part = "forget" if forget else "learn"
    rows = [
        (f"{part} set NLL", m[f"{part}_nll_before"], m[f"{part}_nll_after"]),
        (f"{part} set P(answer)", m[f"{part}_prob_before"], m[f"{part}_prob_after"]),
    ]
    if m.get("holdout_nll_before") is not None:
        rows.append(("never-seen set NLL", m["holdout_nll_before"], m["holdout_nll_after"]))
    if m.get("retain_nll_before") is not None:
        rows.append(("retain set NLL", m["retain_nll_before"], m["retain_nll_after"]))
    rows.append(("WikiText-2 perplexity", ppl_before, ppl()))
    print(f"{entry.method} LoRA (rank {res.config.lora_rank}, {len(res.target_modules)} "
          f"modules), {res.config.epochs} epochs: {res.seconds:.1f}s, "
          f"{res.tokens_per_second:.0f} tokens/s")  # fmt: skip
    if m.get("stop_nll") is not None:
        taken = m.get("stopped_after")
        what = entry.info.get("stop_source") or "stop_nll"
        print(f"stop at forget-set NLL {m['stop_nll']:.4f} ({what}): " + (
            f"reached after {taken} steps" if taken is not None
            else "not reached: more epochs or a larger lr would forget further"))  # fmt: skip
    print(f"{'':24}{'before':>10}{'after':>10}")
    for name, b, a in rows:
        print(f"{name:24}{b:10.4f}{a:10.4f}")
    print(f"recorded: {entry.path} (id {entry.id}); undo with 'edit revert {entry.id}'")
    if entry.info.get("learned_by"):
        by = entry.info["learned_by"]
        print(f"note: entry {by} learned these examples; 'edit revert {by}' removes exactly "
              "everything it learned")  # fmt: skip
    return 0


def cmd_audit(args) -> int:
    from pathlib import Path

    from edit.corpus import Example
    from edit.evals import audit
    from edit.readers.corpus import read_corpus
    from edit.readers.formats import is_tofu_qa
    from edit.readers.rows import read_rows
    from edit.readers.tofu import read_qa

    attack_names = tuple(a for a in args.attacks.split(",") if a and a != "none")
    unknown = [a for a in attack_names if a not in ("quantize", "relearn")]
    if unknown:
        raise EditError(f"--attacks: unknown {', '.join(unknown)}: use quantize, relearn or none")
    forget = read_corpus(args.forget) if args.forget else None  # input errors before loading
    holdout = read_corpus(args.holdout) if args.holdout else None
    relearn = read_corpus(args.relearn) if args.relearn else None
    qa = None
    if args.forget:
        rows, _ = read_rows(args.forget)
        if is_tofu_qa(rows):
            qa = read_qa(args.forget)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_new_folder(out)
    ws = _open(args, create=False)
    entries = ws.entries()
    if not entries:
        raise EditError(f"workspace {ws.path} has no entries to audit")
    entry = ws.entry(args.id) if args.id else entries[-1]
    if forget is None:
        if not entry.facts:
            raise EditError(f"entry {entry.id} is a {entry.kind} run: give its data with --forget")
        forget = [Example(f.text, f.target) for f in entry.facts]
    reference, ref_tok = audit.load_reference(args.reference, args.device)
    print(_base_model_line(ws))
    print(f"auditing {entry.summary()} on {len(forget)} forget examples"
          + (f", {len(holdout)} holdout" if holdout else ""))  # fmt: skip
    report = audit.audit(ws, entry.id, audit.AuditData(forget, holdout, qa, relearn),
                         reference=reference, reference_tok=ref_tok, attack_names=attack_names,
                         gen_tokens=args.gen_tokens)  # fmt: skip
    out = out or Path(f"audit-out/{entry.id}")
    audit.write(report, out)
    print(audit.markdown(report))
    print(f"wrote {out}/: report.json, report.md, report.png")
    return 0


def cmd_ask(args) -> int:
    from edit import lm
    from edit.api import ask, ask_prompt

    if not args.prompt.strip():
        raise EditError("the prompt is empty: give the text or question for the model")
    if len(args.prompt) > MAX_PROMPT_CHARS:
        raise EditError(
            f"the prompt is {len(args.prompt)} characters long, more than {MAX_PROMPT_CHARS}"
        )
    from pathlib import Path

    from edit.ledger import read_meta

    has_ws = read_meta(Path(args.workspace)) is not None  # a damaged one is refused here
    ws = _open(args, create=False) if has_ws else None
    if ws is None:
        from edit.models import load

        model, tok = load(
            args.model, device=args.device, dtype=args.dtype, device_map=args.device_map
        )
        print(f"model: {model.edit_source} (no workspace at {args.workspace}: base model)")
    else:
        model, tok = ws.model, ws.tok
        n = len(ws.entries())
        print(_base_model_line(ws) + f" + {n} edit{'s' * (n != 1)} from {ws.path}")
    if args.top > len(tok):
        raise EditError(f"--top {args.top}: this model has only {len(tok)} tokens")
    prompt = ask_prompt(tok, args.prompt, args.chat)
    answer = ask(model, tok, args.prompt, chat=args.chat,
                 max_new_tokens=args.tokens or (48 if args.chat else 12))  # fmt: skip
    if args.chat:
        print(f"user: {args.prompt}\nassistant: {answer.strip()}")
    else:
        print(f"{args.prompt}{answer}")
    print("next token:" if not args.chat else "first token of the answer:")
    for text, p in lm.top_next(model, tok, prompt, k=args.top):
        print(f"  {p:7.4f}  {text!r}")
    return 0


def cmd_verify(args) -> int:
    from pathlib import Path

    from edit.ledger import read_ledger, read_meta
    from edit.lock import WorkspaceLock
    from edit.workspace import check_shapes

    path = Path(args.workspace)
    meta = read_meta(path)
    if meta is None:
        raise EditError(f"no workspace at {path}: nothing to verify")
    with WorkspaceLock(path).shared():
        ledger = read_ledger(path)
    shapes = check_shapes(ledger, meta["base"]["source"])
    for problem in ledger.problems:
        print(f"problem: {problem}")
    if ledger.problems:
        n = len(ledger.problems)
        raise EditError(
            f"workspace {path} has {n} problem{'s' * (n != 1)}"
            + (" (listed above)" if n > 1 else "") + f": {ledger.problems[0]}"
        )  # fmt: skip
    base = meta["base"]
    print(f"workspace {path}: ok: base {base['source']} ({base['hash'][:19]}…); "
          f"{len(ledger.lines)} manifest line{'s' * (len(ledger.lines) != 1)}, chained; "
          f"{len(ledger.active)} active and {len(ledger.reverted)} reverted entries, every "
          f"content hash as recorded, every factor finite"
          + ("" if shapes else "; shapes not checked (the base model's config is not at hand: "
             "they are checked when it is loaded)"))  # fmt: skip
    if ledger.repairs or ledger.leftovers:
        print(f"note: an interrupted write left {len(ledger.repairs)} rename(s) to finish and "
              f"{len(ledger.leftovers)} temporary file(s); the next change to the workspace "
              f"completes and removes them")  # fmt: skip
    return 0


def cmd_log(args) -> int:
    from edit.workspace import Workspace

    ws = Workspace.inspect(args.workspace)
    entries = ws.entries()
    print(f"workspace {ws.path}: base {ws.base['source']} ({ws.base['hash'][:19]}…)")
    if not entries:
        print("no edits")
    for e in entries:
        print(e.summary())
    reverted = ws.entries("reverted")
    if reverted:
        print(f"({len(reverted)} reverted: {', '.join(e.id for e in reverted)})")
    return 0


def cmd_revert(args) -> int:
    ws = _open(args, create=False, writer=True, dropping=args.id)
    if args.id.zfill(4) in ws.broken:
        problem = ws.drop(args.id)
        n = len(ws.entries())
        print(f"dropped entry {args.id.zfill(4)}: {problem.split(', or drop')[0]}")
        print(f"the model is now the base plus {n} edit{'s' * (n != 1)}")
        return 0
    entry = ws.revert(args.id)
    print(f"reverted {entry.id}: {entry.summary()}")
    left = ws.entries()
    print(
        f"the model is now the base plus {len(left)} edit{'s' * (len(left) != 1)}; "
        f"the file moved to {ws.path / 'reverted' / entry.path.name}"
    )
    return 0


def cmd_export(args) -> int:
    check_new_folder(args.dir)  # before loading the model
    ws = _open(args, create=False)
    out = ws.export(args.dir)
    n = len(ws.entries())
    print(
        f"exported {ws.base['source']} + {n} edit{'s' * (n != 1)} to {out} (safetensors; "
        f"load with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))"
    )
    return 0


COMMANDS = {
    "add": cmd_add,
    "erase": cmd_erase,
    "ask": cmd_ask,
    "eval": cmd_eval,
    "forget": cmd_train,
    "learn": cmd_train,
    "trace": cmd_trace,
    "audit": cmd_audit,
    "log": cmd_log,
    "revert": cmd_revert,
    "export": cmd_export,
    "verify": cmd_verify,
}


if __name__ == "__main__":
    sys.exit(main())
