"""``edit add``, ``edit erase`` and ``edit ask``: change a fact, and see what the model says."""

from __future__ import annotations

import time

from edit.cli.options import (
    MAX_PROMPT_CHARS,
    base_model_line,
    check_layers_fit,
    common,
    edit_args,
    head_line,
    int_in,
    layer_settings,
    open_workspace,
    stats_setting,
)
from edit.errors import EditError


def add_parsers(sub) -> None:
    p = sub.add_parser("add", help="insert or change a fact (ROME)")
    edit_args(p)
    common(p)
    p = sub.add_parser("erase", help="make the model stop asserting a fact")
    edit_args(p)
    common(p)
    p = sub.add_parser("ask", help="what does the (edited) model say?")
    p.add_argument("prompt")
    p.add_argument("--top", type=int_in(1, 1000), default=5, help="how many next-token candidates")
    p.add_argument("--tokens", type=int_in(1, 4096), default=None,
                   help="length of the greedy completion (default 12; 48 with --chat)")  # fmt: skip
    p.add_argument("--chat", action="store_true",
                   help="ask PROMPT as a user turn of the model's chat template")  # fmt: skip
    common(p)


def cmd_add(args, erase: bool = False) -> int:
    from edit import methods
    from edit.api.edits import as_fact
    from edit.api.workspace import default_method
    from edit.config import check_settings, parse_settings
    from edit.models import DEFAULT_MODEL

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
    # the method, decided before loading, so that its settings are checked first
    source = args.model or _recorded_source(args.workspace) or DEFAULT_MODEL
    spec = methods.get(args.method or default_method(batch, _has_edits(args.workspace), source))
    layers = layer_settings(args.layer, spec.batch)
    settings = {**parse_settings(args.set), **layers, **stats_setting(args)}  # flags win
    if args.steps is not None:
        settings["steps"] = args.steps
    check_settings(spec.name, spec.config_class, settings)  # bad values before loading
    check_layers_fit(layers, source)
    ws = open_workspace(args, writer=True)
    print(base_model_line(ws))
    n = len(ws.entries())
    if n:
        print(f"workspace: {ws.path} ({n} earlier edit{'s' * (n != 1)} applied)")
    t0 = time.perf_counter()
    change = ws.add(request, method=spec.name, erase=erase, **settings)
    entry, res = change.entry, change.result
    if batch:
        _print_batch(res, erase, time.perf_counter() - t0)
    else:
        _print_single(res, erase, time.perf_counter() - t0)
    print(f"recorded: {entry.path} (id {entry.id}); undo with 'edit revert {entry.id}'")
    print(head_line(ws))
    return 0


def _has_edits(workspace: str) -> bool:
    """Whether the workspace holds active edits, from its manifest alone."""
    from pathlib import Path

    from edit.ledger import active_count

    return active_count(Path(workspace)) > 0


def _recorded_source(workspace: str) -> str | None:
    """The base model a workspace records (None: no workspace there yet)."""
    from pathlib import Path

    from edit.ledger import read_meta

    meta = read_meta(Path(workspace))
    return meta["base"]["source"] if meta else None


def _print_single(res, erase: bool, seconds: float) -> None:
    fact, m, info = res.facts[0], res.metrics, res.info
    verb = "erased" if erase else "edited"
    where = info.get("module") or ", ".join(info.get("modules", []))
    if info.get("write") == "neuron":
        where += f": {_neurons(res.config)} added"
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
    _print_reply_round(m.get("reply_round"))
    _print_layer_round(m.get("layer_round"))


def _print_layer_round(r: dict | None) -> None:
    """What the layer round did (``layer_round``): replies that state the edit, at the first
    block(s) and, where some did not, at the other(s)."""
    if not r or not r["replies"]:  # off, or no chat template to ask in
        return
    line = f"asked in chat: {r['stating']} of {r['replies']} replies state the edit"
    if r.get("facts", 1) > 1 and r.get("remade"):  # a batch: those whose replies did not
        line += (f"; {r['remade']} facts made again at {_at(r['retry_layer'])}, "
                 f"{r['kept']} kept there (more of their replies state it): "
                 f"{r.get('stating_kept', r['stating'])} of {r['replies']}")  # fmt: skip
    elif "stating_after" in r:
        line += (f"; made again at {_at(r['retry_layer'])}: {r['stating_after']} of "
                 f"{r['replies']}" + ("" if r["kept"] else f" (no better: kept "
                                      f"{_at(r['layer'])})"))  # fmt: skip
    print(line)


def _at(blocks: int | list[int]) -> str:
    """The blocks in words: "layer 6", "layers 6-10" or "layers 4, 6"."""
    if isinstance(blocks, int):
        return f"layer {blocks}"
    if blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"layers {blocks[0]}-{blocks[-1]}"
    return "layers " + ", ".join(map(str, blocks))


def _print_reply_round(r: dict | None) -> None:
    """What the reply round did (``reply_round``): replies naming the new object, before and
    after the edit was made again with their openings."""
    if not r or not r["replies"]:  # off, or no chat template to ask in
        return
    line = f"asked in chat: {r['named']} of {r['replies']} replies name the new object"
    if "named_after" in r:
        whose = "1 reply's opening" if r["openings"] == 1 else f"{r['openings']} replies' openings"
        line += (f"; made again with {whose}: {r['named_after']} of {r['replies']}"
                 + ("" if r["kept"] else " (no better: kept the first edit)"))  # fmt: skip
    print(line)


def _neurons(config) -> str:
    """What the neuron write adds for one fact: a neuron, or a pair (``pair_gate``)."""
    return "a neuron pair" if getattr(config, "pair_gate", 0) else "one neuron"


def _print_batch(res, erase: bool, seconds: float) -> None:
    m, info = res.metrics, res.info
    n = m["facts"]
    verb = "erased" if erase else "edited"
    per = "per fact and layer" if len(info.get("modules", ())) > 1 else "per fact"  # MEMIT's
    neurons = f" ({_neurons(res.config)} added {per})" if info.get("write") == "neuron" else ""
    print(
        f"{verb} {n} facts in one {res.method.upper()} update of layer"
        f"{'s' if len(res.layers) > 1 else ''} {', '.join(map(str, res.layers))}{neurons}: "
        f"{m['took']}/{n} took; value loss "
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
    _print_reply_round(m.get("reply_round"))
    _print_layer_round(m.get("layer_round"))
    for line in m["not_taken"][:5]:
        print(f"did not take: {line}")
    if len(m["not_taken"]) > 5:
        print(f"... and {len(m['not_taken']) - 5} more (see 'edit log')")


def cmd_erase(args) -> int:
    return cmd_add(args, erase=True)


def cmd_ask(args) -> int:
    from edit import lm
    from edit.api.edits import ask, ask_prompt

    if not args.prompt.strip():
        raise EditError("the prompt is empty: give the text or question for the model")
    if len(args.prompt) > MAX_PROMPT_CHARS:
        raise EditError(
            f"the prompt is {len(args.prompt)} characters long, more than {MAX_PROMPT_CHARS}"
        )
    from pathlib import Path

    from edit.ledger import read_meta

    has_ws = read_meta(Path(args.workspace)) is not None  # a damaged one is refused here
    ws = open_workspace(args, create=False) if has_ws else None
    if ws is None:
        from edit.models import load

        model, tok = load(
            args.model, device=args.device, dtype=args.dtype, device_map=args.device_map
        )
        print(f"model: {model.edit_source} (no workspace at {args.workspace}: base model)")
    else:
        model, tok = ws.model, ws.tok
        n = len(ws.entries())
        print(base_model_line(ws) + f" + {n} edit{'s' * (n != 1)} from {ws.path}")
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


COMMANDS = {"add": cmd_add, "erase": cmd_erase, "ask": cmd_ask}
