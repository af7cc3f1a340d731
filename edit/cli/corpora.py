"""``edit forget``, ``edit learn`` and ``edit audit``: train a LoRA change on a corpus,
and prove what a change did."""

from __future__ import annotations

from edit.atomic import check_new_folder
from edit.cli.options import base_model_line, common, int_in, number, open_workspace, set_arg
from edit.errors import EditError


def add_parsers(sub) -> None:
    for name, what in (("forget", "unlearn a corpus (LoRA)"), ("learn", "learn a corpus (LoRA)")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--corpus", required=True, help="JSON Lines: {'text'}, {'question', "
                       "'answer'} or {'prompt', 'completion'} per line")  # fmt: skip
        if name == "forget":
            p.add_argument("--retain", help="examples to keep (default: shipped WikiText-2 text)")
            p.add_argument("--method", default=None, help="npo (default), graddiff, "
                           "gradascent, simnpo, undial, rename (needs each line's \"subject\"); "
                           "distill (the default with --reference, or "
                           "where a learn entry of this workspace learned the corpus) or "
                           "match")  # fmt: skip
            p.add_argument("--holdout", help="never-seen examples of the same kind: reported "
                           "beside the corpus, and (without --reference or a learn entry of "
                           "the corpus) training stops once the corpus's NLL reaches "
                           "theirs")  # fmt: skip
            p.add_argument("--reference", help="a model that never saw the corpus (the base "
                           "model this one was fine-tuned from: id, folder or workspace): "
                           "each token of the corpus is aimed at its distribution (method "
                           "distill, by an adapter that reads only where this model differs "
                           "from it), and its NLL on the corpus is the level printed (other "
                           "methods stop there); the retain set is held to it where this "
                           "model reads the retain set far worse")  # fmt: skip
        else:
            p.add_argument("--holdout", help="never-seen examples of the same kind, scored "
                           "before and after: learning the facts, not only the form of the "
                           "text, moves them much less than the corpus")  # fmt: skip
            p.add_argument("--force", action="store_true", help="record the change even when "
                           "WikiText-2 perplexity or the general-knowledge probe falls past "
                           "its bound")  # fmt: skip
        # the defaults are methods.unlearn.OBJECTIVE_DEFAULTS (not imported here: no torch)
        epochs, lr = (
            ("20; a stop level may end it sooner", "2e-4") if name == "forget" else ("6", "3e-4")
        )
        p.add_argument("--epochs", type=int_in(1), default=None, help=f"passes over the corpus "
                       f"(default {epochs})")  # fmt: skip
        p.add_argument("--lr", type=number(positive=True), default=None,
                       help=f"AdamW learning rate (default {lr})")  # fmt: skip
        p.add_argument("--lora-rank", type=int_in(1), default=None)
        set_arg(p, "any other setting of edit.methods.unlearn.UnlearnConfig, e.g. kl_weight=5 "
                 "or retain_batch_size=16")  # fmt: skip
        common(p)
    p = sub.add_parser("audit", help="prove a forget / erase entry: MIA, extraction, attacks")
    p.add_argument("id", nargs="?", help="the entry to audit (default: the last one; in a "
                   "workspace without entries, the model as it is)")  # fmt: skip
    p.add_argument("--forget", help="the forgotten examples (JSONL / TOFU JSON; default for an "
                   "erase entry: its facts)")  # fmt: skip
    p.add_argument("--holdout", help="at least 2 examples of the same kind the model never "
                   "saw, none of them in the forget set (for MIA)")  # fmt: skip
    p.add_argument("--reference", help="a workspace folder or model that never saw the forget "
                   "set, not the audited one: the control every check and attack is judged "
                   "against (without it membership, forget NLL and forget quality are not "
                   "run)")  # fmt: skip
    p.add_argument("--attacks", default="quantize,relearn", help="quantize, relearn or none")
    p.add_argument("--relearn", help="relearning sample, e.g. related retained data of the "
                   "same kind (default: shipped WikiText-2 slices); run on the reference too, "
                   "and its examples left out of the after-attack membership AUC")  # fmt: skip
    p.add_argument("--gen-tokens", type=int_in(1, 4096), default=32,
                   help="greedy tokens for extraction")  # fmt: skip
    p.add_argument("--out", default=None, help="report folder (default: audit-out/<id>)")
    common(p)


def cmd_train(args) -> int:
    from edit.config import parse_settings
    from edit.readers.corpus import read_corpus

    forget = args.command == "forget"
    extra = parse_settings(args.set)
    data = read_corpus(args.corpus)  # input errors before loading
    retain = read_corpus(args.retain) if forget and args.retain else None
    holdout = read_corpus(args.holdout) if args.holdout else None
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
    ws = open_workspace(args, writer=True)
    print(base_model_line(ws))
    if forget:  # measured and recorded, never refused: forgetting is asked for
        from edit.evals.knowledge import Guard

        guard = Guard(ws.model, ws.tok, refuse=False)
        change = ws.forget(data, retain, holdout=holdout, reference=args.reference,
                           guard=guard, **settings)  # fmt: skip
        entry, res = change.entry, change.result
        health = _health_rows(guard)
    else:
        entry, res, health = _learn(ws, args, data, holdout, settings)
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
    rows += health
    confined = ""
    if res.config.confine:
        confined = ", each reading where the model differs from the reference"
    print(f"{entry.method} LoRA (rank {res.config.lora_rank}, {len(res.target_modules)} "
          f"modules{confined}), {res.config.epochs} epochs: {res.seconds:.1f}s, "
          f"{res.tokens_per_second:.0f} tokens/s")  # fmt: skip
    if forget:
        _say_level(m, entry.info, entry.method)
        if held := entry.info.get("retain_held_to"):
            _say_hold(held)
        if taught := entry.info.get("form_taught"):
            print(f"teacher: the reference after learning {taught['examples']} "
                  f"{taught['from']} examples ({taught['seconds']:.1f}s), so that it knows the "
                  "form of the corpus's examples and none of the corpus")  # fmt: skip
    _table(rows)
    if problems := entry.info.get("guard", {}).get("past_bounds"):
        why = "(--force)" if not forget else "(a forget run is recorded whatever its health)"
        print(f"recorded although {why}: {'; '.join(problems)}")
    print(f"recorded: {entry.path} (id {entry.id}); undo with 'edit revert {entry.id}'")
    if entry.info.get("learned_by"):
        by = entry.info["learned_by"]
        print(f"note: entry {by} learned these examples; 'edit revert {by}' removes exactly "
              "everything it learned")  # fmt: skip
    return 0


def _say_level(m: dict, info: dict, method: str) -> None:
    """Print the level a forget run aimed at, where it came from and what it guarantees."""
    from edit.methods.unlearn.losses import NEEDS_RENAMED, NEEDS_TARGETS, NEEDS_TEACHER
    from edit.methods.unlearn.policy import STOP_MEANS

    kind = info.get("stop_source")
    if m.get("stop_nll") is None or kind is None:
        print("no stop level (no --reference, --holdout or learn entry): every epoch ran, and "
              "nothing shows the corpus is at the level of never-seen text")  # fmt: skip
        return
    source = {"reference": f"the reference's NLL on the corpus ({info.get('reference')})",
              "holdout": "the never-seen set's NLL",
              "learned": f"its NLL without entry {info.get('learned_by')}, which learned it",
              "stop_nll": "stop_nll"}[kind]  # fmt: skip
    taken = m.get("stopped_after")
    if method in NEEDS_TEACHER | NEEDS_TARGETS | NEEDS_RENAMED:
        outcome = (f"{method} aims each example at its own never-seen level (no stop): "
                   f"forget-set NLL {m['forget_nll_after']:.4f} at the end")  # fmt: skip
    elif taken is not None:
        outcome = f"reached after {taken} steps"
    else:
        outcome = "not reached: more epochs or a larger lr would forget further"
    print(f"aimed at forget-set NLL {m['stop_nll']:.4f} ({source}): {STOP_MEANS[kind]}; "
          f"{outcome}")  # fmt: skip


def _say_hold(held: dict) -> None:
    """Print what the retain set's KL held it to, and why (``policy.retain_hold``)."""
    before, ref = held["perplexity_before"], held["perplexity_reference"]
    if held["to"] == "reference":
        facts = f", with {held['facts']} shipped factual prompts" if held.get("facts") else ""
        print(f"retain set held to the reference{facts}: the model before reads it at "
              f"perplexity {before:.1f}, the reference at {ref:.1f} (the fine-tune damaged "
              "it)")  # fmt: skip
    else:
        print(f"retain set held to the model before (perplexity {before:.1f}; the reference "
              f"{ref:.1f})")  # fmt: skip


def _learn(ws, args, data, holdout, settings: dict):
    """``ws.learn`` under a :class:`~edit.evals.knowledge.Guard` (refusing, unless
    ``--force``): (entry, result, the health rows before / after)."""
    from edit.evals.knowledge import Guard

    guard = Guard(ws.model, ws.tok, refuse=not args.force, advice=LEARN_ADVICE)
    try:
        change = ws.learn(data, holdout=holdout, guard=guard, **settings)
        entry, res = change.entry, change.result
    except EditError:
        if guard.after is not None:  # measured and refused: what it saw, then the one line
            _table(_health_rows(guard))
        raise
    return entry, res, _health_rows(guard)


# a learn run refused by the guard: the settings that trade learning for keeping
LEARN_ADVICE = ("lower --lr or --epochs, or raise --set kl_weight=..., and run again; --force "
                "records it anyway")  # fmt: skip


def _health_rows(guard) -> list[tuple[str, float, float]]:
    b, a = guard.before, guard.after
    return [("WikiText-2 perplexity", b.perplexity, a.perplexity),
            ("general facts log P(answer)", b.answer_logp, a.answer_logp)]  # fmt: skip


def _table(rows) -> None:
    print(f"{'':24}{'before':>10}{'after':>10}")
    for name, b, a in rows:
        print(f"{name:24}{b:10.4f}{a:10.4f}")


def cmd_audit(args) -> int:
    from pathlib import Path

    from edit.api.workspace import load_reference
    from edit.corpus import Example
    from edit.evals import audit
    from edit.readers.corpus import read_corpus
    from edit.readers.formats import is_tofu_qa
    from edit.readers.tofu import qa_records

    attack_names = tuple(a for a in args.attacks.split(",") if a and a != "none")
    unknown = [a for a in attack_names if a not in audit.ATTACKS]
    if unknown:
        raise EditError(f"--attacks: unknown {', '.join(unknown)}: use quantize, relearn or none")
    forget = read_corpus(args.forget) if args.forget else None  # input errors before loading
    holdout = read_corpus(args.holdout) if args.holdout else None
    relearn = read_corpus(args.relearn) if args.relearn else None
    qa = None
    if forget is not None and is_tofu_qa([row for _, row in forget.records]):
        qa = qa_records(args.forget, forget.records)
    files = {role: path for role, path in (("forget", args.forget), ("holdout", args.holdout),
             ("relearn", args.relearn), ("reference", args.reference)) if path}  # fmt: skip
    if forget is not None:  # an erase entry's facts are checked once the workspace is open
        audit.check_inputs(audit.AuditData(forget, holdout, relearn=relearn))
    out = Path(args.out) if args.out else None
    if out is not None:
        check_new_folder(out)
    ws = _audited_workspace(args, with_data=forget is not None)
    entries = ws.entries()
    entry = ws.entry(args.id) if args.id else entries[-1] if entries else None
    if forget is None:
        if entry is None:
            raise EditError(f"workspace {ws.path} has no entries: give the data with --forget "
                            "to audit the model as it is")  # fmt: skip
        if not entry.facts:
            raise EditError(f"entry {entry.id} is a {entry.kind} run: give its data with --forget")
        forget = [Example(f.text, f.target) for f in entry.facts]
    reference, ref_tok = load_reference(args.reference, args.device)
    print(base_model_line(ws))
    what = entry.summary() if entry else "the model as it is (the workspace has no entries)"
    print(f"auditing {what} on {len(forget)} forget examples"
          + (f", {len(holdout)} holdout" if holdout else ""))  # fmt: skip
    data = audit.AuditData(forget, holdout, qa, relearn, files)
    report = audit.audit(ws, entry.id if entry else None, data,
                         reference=reference, reference_tok=ref_tok, attack_names=attack_names,
                         gen_tokens=args.gen_tokens)  # fmt: skip
    out = out or Path(f"audit-out/{entry.id if entry else 'model'}")
    audit.write(report, out)
    print(audit.markdown(report))
    print(f"wrote {out}/: audit.json (the certificate: {audit.certificate_verdict(report)}), "
          "report.json, report.md, report.png")  # fmt: skip
    return 0


def _audited_workspace(args, with_data: bool):
    """The workspace to audit; where there is none, the model (``-m``) as it is, opened as a
    workspace in a temporary folder (removed when the command exits) so nothing is written.
    Without the data (``with_data`` False) that is refused before the model loads."""
    import tempfile
    from pathlib import Path

    from edit.ledger import read_meta

    if read_meta(Path(args.workspace)) is not None:  # a damaged one is refused here
        return open_workspace(args, create=False)
    if not with_data:
        raise EditError(f"no workspace at {args.workspace}: give the data with --forget to "
                        "audit the model as it is")  # fmt: skip
    print(f"no workspace at {args.workspace}: auditing the model as it is")
    args.workspace = args.cleanup.enter_context(tempfile.TemporaryDirectory(prefix="edit-audit-"))
    return open_workspace(args, create=True)


COMMANDS = {"forget": cmd_train, "learn": cmd_train, "audit": cmd_audit}
